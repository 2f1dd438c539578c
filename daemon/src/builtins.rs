//! The built-in plugin list: every plugin compiled into berthd, in registration order.

use berth_core::Result;
use berth_core::registry::Registry;

/// A registry holding every built-in plugin.
pub fn registry() -> Result<Registry> {
    let mut registry = Registry::new();
    registry.register(berth_core::events::registration())?;
    registry.register(berth_content_local::registration())?;
    registry.register(berth_snapshot_native::registration())?;
    registry.register(berth_snapshot_overlay::registration())?;
    registry.register(berth_core::metadata::registration())?;
    registry.register(berth_core::metadata::scheduler::registration())?;
    registry.register(berth_diff_walking::plugin::registration())?;
    registry.register(berth_transfer::registration())?;
    for registration in berth_services::registrations() {
        registry.register(registration)?;
    }
    Ok(registry)
}
