//! `berthd config default|migrate|check`.

use std::path::Path;
use std::process::ExitCode;

use berth_core::config::{self, Config, Loaded};
use berth_core::registry::Registry;

use crate::builtins;

/// The default configuration with every built-in plugin's default section.
pub fn default_config() -> anyhow::Result<Config> {
    let registry = builtins::registry()?;
    Ok(Config {
        plugins: registry
            .default_configs()?
            .into_iter()
            .map(|(uri, table)| (uri, toml::Value::Table(table)))
            .collect(),
        ..Config::default()
    })
}

pub fn print_default() -> ExitCode {
    match default_config() {
        Ok(config) => {
            print!("{}", config::render(&config));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berthd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(file: Option<&Path>) -> Result<Loaded, ExitCode> {
    let Some(file) = file else {
        eprintln!("berthd: name a file: berthd config <migrate|check> FILE (or --config FILE)");
        return Err(ExitCode::from(2));
    };
    config::load(file).map_err(|e| {
        eprintln!("berthd: {e}");
        ExitCode::FAILURE
    })
}

pub fn migrate(file: Option<&Path>) -> ExitCode {
    match load(file) {
        Ok(loaded) => {
            print!("{}", config::render(&loaded.config));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The registry berthd starts with for `config`: the built-in plugins, the
/// `[proxy_plugins]` and the plugins of the libraries in `plugin_dir` (loaded: blocking),
/// with the refusals of libraries. A broken `[proxy_plugins]` section is an error naming it.
pub fn full_registry(config: &Config) -> anyhow::Result<(Registry, Vec<String>)> {
    let problems = crate::proxy::check(config);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let mut registry = builtins::registry()?;
    crate::proxy::register(&mut registry, config)?;
    let refusals = match &config.plugin_dir {
        Some(dir) => crate::dynamic::register(&mut registry, crate::dynamic::load_dir(dir)),
        None => Vec::new(),
    };
    Ok((registry, refusals))
}

/// Everything worth saying about a loaded configuration, given the registry berthd starts
/// with ([`full_registry`]), so sections of proxy and library plugins count as known:
/// (warnings, infos).
pub fn review(loaded: &Loaded, registry: &Registry) -> (Vec<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut infos = Vec::new();
    for notice in &loaded.notices {
        if notice.is_warning() {
            warnings.push(notice.to_string());
        } else {
            infos.push(notice.to_string());
        }
    }
    for notice in registry.check_sections(&loaded.config.plugins) {
        use berth_core::registry::SectionNotice;
        match notice {
            SectionNotice::NotBuilt { .. } => infos.push(notice.to_string()),
            _ => warnings.push(notice.to_string()),
        }
    }
    let known = registry.uris();
    for (list, name) in [
        (&loaded.config.disabled_plugins, "disabled_plugins"),
        (&loaded.config.required_plugins, "required_plugins"),
    ] {
        for uri in list.iter().filter(|u| !known.contains(u)) {
            warnings.push(format!(
                "{name} names {uri:?}, which is neither built in nor a proxy or library plugin"
            ));
        }
    }
    (warnings, infos)
}

pub fn check(file: Option<&Path>) -> ExitCode {
    let loaded = match load(file) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let (registry, refusals) = match full_registry(&loaded.config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berthd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (mut warnings, infos) = review(&loaded, &registry);
    warnings.extend(refusals);
    for info in &infos {
        eprintln!("notice: {info}");
    }
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if let Err(e) = crate::daemon::parse_level(&loaded.config.debug.level) {
        eprintln!("berthd: {e}");
        return ExitCode::FAILURE;
    }
    let path = file.map(|f| f.display().to_string()).unwrap_or_default();
    println!(
        "{path}: valid configuration ({} warning{})",
        warnings.len(),
        if warnings.len() == 1 { "" } else { "s" }
    );
    ExitCode::SUCCESS
}
