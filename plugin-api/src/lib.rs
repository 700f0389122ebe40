//! The contract between the nbnet host and its plugins, and nothing else.
//!
//! # Brief overview
//!
//! nbnet serves length-framed TCP requests and hands each request payload to a
//! *plugin*: a shared library (`.so`) that each worker process loads after it
//! is forked. This crate defines what crosses that boundary:
//!
//! - [`abi`]: the `#[repr(C)]` types both sides agree on — the response sink
//!   ([`abi::RawResponse`]), the init context ([`abi::RawInitContext`]), the C
//!   plugin table ([`abi::CPlugin`], mirrored in `include/nbnet_plugin.h`) and the
//!   Rust root module ([`abi::RustPlugin`], layout-checked by `abi_stable` at load).
//! - [`sink`]: the host side of a response (one implementation shared by the
//!   nbnet host and the test helper, so both enforce the same rules).
//! - [`sdk`] (feature `sdk`, on by default): what a Rust plugin author uses — the
//!   [`Plugin`] trait and the [`export_plugin!`] macro. The host builds without it.
//!
//! # Why the boundary looks like this
//!
//! - **One call per request, through a plain function pointer.** Both kinds of
//!   plugin end up as the same `process(state, request, len, response) -> i32`
//!   pointer in the host, so the hot path does not care which language wrote it.
//! - **The host owns every buffer.** A plugin appends its answer through
//!   `response.write`, which copies into the host's output buffer; nothing
//!   allocated on one side is ever freed on the other (a plugin has its own copy
//!   of std and of the allocator).
//! - **Panics stop inside the plugin.** The [`export_plugin!`] trampolines catch
//!   them and turn them into an error for that request; a panic crossing the
//!   boundary would end the worker.
//!
//! # Writing a Rust plugin
//!
//! ```
//! use nbnet_plugin_api::{export_plugin, Error, InitContext, NoConfig, Plugin, Response};
//!
//! pub struct Upper;
//!
//! impl Plugin for Upper {
//!     type Config = NoConfig;
//!
//!     fn new(_config: NoConfig, _ctx: &InitContext) -> Result<Self, Error> {
//!         Ok(Upper)
//!     }
//!
//!     fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
//!         response.write(&request.to_ascii_uppercase())
//!     }
//! }
//!
//! export_plugin!(Upper);
//! ```
//!
//! Build it as a `cdylib` (`[lib] crate-type = ["cdylib", "rlib"]`), then name
//! the `.so` in the `[[plugins]]` table of the nbnet config.

#![deny(missing_docs)]

pub mod abi;
#[cfg(feature = "sdk")]
pub mod sdk;
pub mod sink;

#[cfg(feature = "sdk")]
pub use sdk::{Connection, Deferred, Error, InitContext, Logger, NoConfig, Plugin, Response};
#[cfg(feature = "sdk")]
pub mod testing;

/// Re-exported so that [`export_plugin!`] works without the plugin crate
/// depending on `abi_stable` itself.
#[doc(hidden)]
pub use abi_stable;
