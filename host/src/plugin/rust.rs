//! Rust plugins: a library exporting an `abi_stable` root module
//! ([`RustPluginRef`], made by `export_plugin!`), layout-checked at load.
//!
//! `RootModule::load_from_file` is *not* used: it caches one module per type
//! per process, so a second, different plugin would silently be the first
//! one again. `lib_header_from_path` loads each file on its own.

use std::path::Path;

use abi_stable::library::{lib_header_from_path, LibraryError, ROOT_MODULE_LOADER_NAME};
use nbnet_plugin_api::abi::RustPluginRef;

use super::{check_abi, Entry, Hooks, Kind};

/// Whether `library` exports an `abi_stable` root module at all.
pub(super) fn is_rust_plugin(library: &libloading::Library) -> bool {
    // SAFETY: only the symbol's presence is checked; nothing is read or called.
    unsafe { library.get::<*const u8>(ROOT_MODULE_LOADER_NAME.as_bytes()) }.is_ok()
}

/// Loads the root module at `path`, checking version and layout.
pub(super) fn load(path: &Path) -> Result<Entry, String> {
    let module = lib_header_from_path(path)
        .and_then(|header| header.init_root_module::<RustPluginRef>())
        .map_err(|e| summarize(path, &e))?;
    check_abi(module.abi_major(), module.abi_minor())?;
    Ok(Entry {
        kind: Kind::Rust,
        own_name: module.name().to_string(),
        own_version: module.version().to_string(),
        abi: (module.abi_major(), module.abi_minor()),
        init: module.init(),
        process: module.process(),
        destroy: Some(module.destroy()),
        // A field past the prefix: `None` for a module built without it.
        process_batch: module.process_batch(),
        hooks: Hooks {
            on_open: Some(module.on_open()),
            on_close: Some(module.on_close()),
            on_shutdown: Some(module.on_shutdown()),
        },
        library: None,
    })
}

/// One line for the user; the full report (a layout dump can run to a
/// thousand lines) goes to the debug log.
fn summarize(path: &Path, error: &LibraryError) -> String {
    tracing::debug!("full abi_stable report for {}:\n{error}", path.display());
    match error {
        LibraryError::AbiInstability(_) => "incompatible ABI: its types do not match this host's nbnet-plugin-api layout; rebuild it against this nbnet (set [log] level = \"debug\" for the layout report)".into(),
        LibraryError::IncompatibleVersionNumber { .. } => format!(
            "incompatible ABI: {}; rebuild it against this nbnet's plugin-api",
            first_line(error)
        ),
        _ => first_line(error),
    }
}

fn first_line(error: &LibraryError) -> String {
    let text = error.to_string();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("unknown abi_stable error")
        .trim()
        .to_string()
}
