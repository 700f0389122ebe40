//! C plugins: a library exporting `nbnet_plugin_entry`, loaded with libloading.
//! The contract is `plugin-api/include/nbnet_plugin.h`.

use std::ffi::c_char;

use nbnet_plugin_api::abi::{CPlugin, C_ENTRY_SYMBOL};

use super::{check_abi, Entry, Hooks, Kind};

/// The smallest table this host accepts: every field through `destroy`
/// (ABI 1.0's required part). Later fields are read only when the plugin's
/// `struct_size` says it has them.
const MIN_STRUCT_SIZE: usize = std::mem::offset_of!(CPlugin, on_open);

/// Whether a table of `size` bytes includes the field at `offset`.
fn has_field(size: usize, offset: usize) -> bool {
    size >= offset + std::mem::size_of::<usize>()
}

type EntryFn = unsafe extern "C" fn() -> *const CPlugin;

/// The ABI numbers of a C plugin's table, whatever their values.
pub(super) fn abi_of(library: &libloading::Library) -> Option<(u32, u32)> {
    // SAFETY: the symbol, if present, has the signature nbnet_plugin.h declares.
    let entry_fn = unsafe { library.get::<EntryFn>(C_ENTRY_SYMBOL.as_bytes()) }.ok()?;
    // SAFETY: as above; the function returns a pointer to a static table.
    let table = unsafe { (*entry_fn)() };
    if table.is_null() {
        return None;
    }
    // SAFETY: the two leading u32s exist in every version of the table.
    Some(unsafe { ((*table).abi_major, (*table).abi_minor) })
}

/// Finds and validates a C plugin's table in `library`. `Ok(None)` means the
/// library has no C entry point (it may be a Rust plugin).
pub(super) fn find(library: &libloading::Library) -> Result<Option<Entry>, String> {
    // SAFETY: the symbol, if present, is declared in nbnet_plugin.h with this
    // exact signature.
    let entry_fn = match unsafe { library.get::<EntryFn>(C_ENTRY_SYMBOL.as_bytes()) } {
        Ok(symbol) => *symbol,
        Err(_) => return Ok(None),
    };
    // SAFETY: as above; the function takes nothing and returns a static pointer.
    let table = unsafe { entry_fn() };
    if table.is_null() {
        return Err(format!("{C_ENTRY_SYMBOL}() returned NULL"));
    }
    // SAFETY: a non-NULL pointer to the plugin's static table. Only the three
    // leading u32s, present in every version, are read before checking them.
    let (major, minor, size) =
        unsafe { ((*table).abi_major, (*table).abi_minor, (*table).struct_size) };
    check_abi(major, minor)?;
    if (size as usize) < MIN_STRUCT_SIZE {
        return Err(format!(
            "its nbnet_plugin table is {size} bytes, smaller than the {MIN_STRUCT_SIZE} this ABI requires; was it built with nbnet_plugin.h?"
        ));
    }
    // SAFETY: version and size checked: the table has every required field
    // (through `destroy`), read here one by one through the pointer.
    let (name, version, init, process, destroy) = unsafe {
        (
            (*table).name,
            (*table).version,
            (*table).init,
            (*table).process,
            (*table).destroy,
        )
    };
    let (Some(init), Some(process)) = (init, process) else {
        return Err("its nbnet_plugin table has a NULL init or process".into());
    };
    let size = size as usize;
    // SAFETY (each hook): read only when `struct_size` says the plugin's
    // table has that field; a shorter table's memory is never touched.
    let hooks = Hooks {
        on_open: has_field(size, std::mem::offset_of!(CPlugin, on_open))
            .then(|| unsafe { (*table).on_open })
            .flatten(),
        on_close: has_field(size, std::mem::offset_of!(CPlugin, on_close))
            .then(|| unsafe { (*table).on_close })
            .flatten(),
        on_shutdown: has_field(size, std::mem::offset_of!(CPlugin, on_shutdown))
            .then(|| unsafe { (*table).on_shutdown })
            .flatten(),
    };
    // SAFETY: as for the hooks; a 1.0 table is too short to have it.
    let process_batch = has_field(size, std::mem::offset_of!(CPlugin, process_batch))
        .then(|| unsafe { (*table).process_batch })
        .flatten();
    Ok(Some(Entry {
        kind: Kind::C,
        own_name: static_str(name),
        own_version: static_str(version),
        abi: (major, minor),
        init,
        process,
        destroy,
        process_batch,
        hooks,
        library: None,
    }))
}

/// Copies a static C string from a plugin table ("?" when NULL).
fn static_str(text: *const c_char) -> String {
    if text.is_null() {
        return "?".into();
    }
    // At most this much is read: a string without its NUL would otherwise
    // be read on through whatever memory follows it.
    const MAX: usize = 4096;
    // SAFETY: the header requires NUL-terminated static strings; strnlen
    // stops at MAX whatever the plugin gave, and the slice is that long.
    let bytes = unsafe {
        let len = libc::strnlen(text, MAX);
        std::slice::from_raw_parts(text.cast::<u8>(), len)
    };
    String::from_utf8_lossy(bytes).into_owned()
}
