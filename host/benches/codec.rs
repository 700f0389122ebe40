//! Criterion benches of the framing code (`nbnet::codec`): decode and encode
//! throughput for small and large frames, and decoding a pipelined stream
//! that arrives split at arbitrary points (as reads deliver it).
//!
//! `cargo bench -p nbnet --bench codec`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nbnet::codec::{encode, write_header, Decoded, FrameDecoder, FrameReader, HEADER_LEN};

/// `count` frames of `size` bytes each, back to back.
fn stream(size: usize, count: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut out = Vec::with_capacity(count * (HEADER_LEN + size));
    for _ in 0..count {
        encode(&payload, &mut out);
    }
    out
}

/// Decodes every frame of `buf` in place, as the reactor does; returns the payload bytes seen.
fn decode_all(decoder: &FrameDecoder, buf: &[u8]) -> usize {
    let mut at = 0;
    let mut seen = 0;
    while let Ok(Decoded::Frame { len }) = decoder.decode(&buf[at..]) {
        seen += len;
        at += HEADER_LEN + len;
    }
    seen
}

fn decode(c: &mut Criterion) {
    let decoder = FrameDecoder::new(16 * 1024 * 1024);
    let mut group = c.benchmark_group("decode");
    for (size, count) in [(64usize, 1024usize), (4096, 64), (65536, 16)] {
        let buf = stream(size, count);
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("in_place", format!("{count}x{size}B")),
            &buf,
            |b, buf| b.iter(|| decode_all(&decoder, black_box(buf))),
        );
    }
    group.finish();
}

fn decode_split(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_split");
    let buf = stream(64, 1024);
    group.throughput(Throughput::Bytes(buf.len() as u64));
    for chunk in [7usize, 100, 1460, 16 * 1024] {
        group.bench_with_input(
            BenchmarkId::new("frame_reader_64B", format!("chunks_of_{chunk}")),
            &buf,
            |b, buf| {
                b.iter(|| {
                    let mut reader = FrameReader::new(16 * 1024 * 1024);
                    let mut frames = 0;
                    for piece in buf.chunks(chunk) {
                        reader.push(black_box(piece));
                        while let Ok(Some(frame)) = reader.next_frame() {
                            frames += frame.len();
                        }
                    }
                    frames
                })
            },
        );
    }
    group.finish();
}

fn encode_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [64usize, 4096, 65536] {
        let payload = vec![b'x'; size];
        let mut out = Vec::with_capacity(HEADER_LEN + size);
        group.throughput(Throughput::Bytes((HEADER_LEN + size) as u64));
        group.bench_function(BenchmarkId::new("encode", format!("{size}B")), |b| {
            b.iter(|| {
                out.clear();
                encode(black_box(&payload), &mut out);
                out.len()
            })
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("write_header", |b| {
        let mut header = [0u8; HEADER_LEN];
        b.iter(|| {
            write_header(black_box(123_456), &mut header);
            header[9]
        })
    });
    group.finish();
}

criterion_group!(benches, decode, decode_split, encode_bench);
criterion_main!(benches);
