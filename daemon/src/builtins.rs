//! The built-in plugin list: every plugin compiled into berthd, in registration order.

use berth_core::Result;
use berth_core::registry::Registry;

/// A registry holding every built-in plugin.
pub fn registry() -> Result<Registry> {
    let mut registry = Registry::new();
    registry.register(berth_core::events::registration())?;
    registry.register(berth_content_local::registration())?;
    registry.register(berth_core::metadata::registration())?;
    registry.register(berth_core::metadata::scheduler::registration())?;
    for registration in berth_services::registrations() {
        registry.register(registration)?;
    }
    Ok(registry)
}
