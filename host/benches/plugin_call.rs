//! Criterion bench of the plugin call: what a 64-byte echo costs through
//! nbnet's plugin path (`Plugin::process`: reserved header, the plugin's
//! `write` callback into the host's buffer, header filled in) for a Rust
//! plugin (abi_stable, `target/release/libecho.so`) and a C plugin
//! (`plugins/echo-c/echo.c`, compiled here into `target/release/libecho_c.so`),
//! against the same work done by a direct Rust call.
//!
//! ```sh
//! cargo build --release -p echo && cargo bench -p nbnet --bench plugin_call
//! ```
//! A missing library is reported and its case skipped.

use std::ffi::CString;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbnet::codec::{write_header, HEADER_LEN};
use nbnet::config::PluginSpec;
use nbnet::plugin::{Plugin, RawConnection, ResponseSink};

const MAX: usize = 16 * 1024 * 1024;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The baseline: the same framing work as the plugin path, as one direct call.
#[inline(never)]
fn direct_echo(request: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(request);
    let header: &mut [u8; HEADER_LEN] = (&mut out[start..start + HEADER_LEN])
        .try_into()
        .expect("HEADER_LEN bytes");
    write_header(request.len(), header);
}

/// Compiles the C echo plugin into target/release/libecho_c.so; its path, or why not.
fn build_c_echo() -> Result<PathBuf, String> {
    let root = root();
    let out = root.join("target/release/libecho_c.so");
    std::fs::create_dir_all(out.parent().expect("has a parent")).map_err(|e| e.to_string())?;
    let status = Command::new("cc")
        .args([
            "-O2",
            "-Wall",
            "-Wextra",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-I",
        ])
        .arg(root.join("plugin-api/include"))
        .arg("-o")
        .arg(&out)
        .arg(root.join("plugins/echo-c/echo.c"))
        .status()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !status.success() {
        return Err(format!("cc failed: {status}"));
    }
    Ok(out)
}

fn load(name: &str, path: &Path) -> Option<Plugin> {
    if !path.exists() {
        println!(
            "plugin_call: skipping {name}: {} is missing (cargo build --release -p echo)",
            path.display()
        );
        return None;
    }
    let spec = PluginSpec {
        name: name.into(),
        path: path.to_path_buf(),
        config_toml: String::new(),
        line: 0,
        image: None,
        threads: 0,
        plugin_timeout: std::time::Duration::from_secs(5),
        max_frame_bytes: 16 << 20,
    };
    match Plugin::load(&spec, 0, 1) {
        Ok(p) => Some(p),
        Err(e) => {
            println!("plugin_call: skipping {name}: {e}");
            None
        }
    }
}

fn plugin_call(c: &mut Criterion) {
    let request = [b'a'; 64];
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let peer = CString::new("127.0.0.1:40000").expect("no NUL");
    let listener = CString::new("127.0.0.1:9000").expect("no NUL");
    let conn = RawConnection {
        id: 1,
        peer: peer.as_ptr(),
        listener: listener.as_ptr(),
        flags: 0,
        tls_version: 0,
        tls_subject: std::ptr::null(),
        tls_sans: std::ptr::null(),
    };
    let mut group = c.benchmark_group("plugin_call_64B_echo");
    group.throughput(Throughput::Elements(1));
    group.bench_function("direct_rust", |b| {
        b.iter(|| {
            out.clear();
            direct_echo(black_box(&request), &mut out);
            out.len()
        })
    });
    let rust = load("echo", &root().join("target/release/libecho.so"));
    let c_path = build_c_echo().unwrap_or_else(|e| {
        println!("plugin_call: cannot build the C echo plugin: {e}");
        root().join("target/release/libecho_c.so")
    });
    let c_plugin = load("echo-c", &c_path);
    for (label, plugin) in [("rust_plugin", rust), ("c_plugin", c_plugin)] {
        let Some(mut plugin) = plugin else { continue };
        // One sink for good, as a worker keeps one: only the buffer is
        // cleared per call.
        let mut sink = ResponseSink::new(Vec::with_capacity(4096), MAX, &conn);
        plugin.process(&request, &mut sink).expect("echo answers");
        assert_eq!(&sink.buffer()[HEADER_LEN..], &request[..], "{label} echoes");
        group.bench_function(label, |b| {
            b.iter(|| {
                sink.buffer_mut().clear();
                plugin
                    .process(black_box(&request), &mut sink)
                    .expect("echo answers");
                sink.buffered()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, plugin_call);
criterion_main!(benches);
