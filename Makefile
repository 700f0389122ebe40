# Convenience targets. `make run` builds everything in release mode (host,
# Rust plugins, the C plugin) and serves config/nbnet.toml; `make test`
# installs the programs the tests use as real peers (haproxy, curl) when
# missing, then runs every test (`cargo test --workspace`).

CC ?= cc
CFLAGS_PLUGIN = -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden -I plugin-api/include

.PHONY: run build test
run: build
	./target/release/nbnet --config config/nbnet.toml

build:
	cargo build --release --workspace
	$(CC) $(CFLAGS_PLUGIN) -o target/release/libupper_c.so plugins/upper-c/upper.c
	$(CC) $(CFLAGS_PLUGIN) -o target/release/libecho_c.so plugins/echo-c/echo.c
	$(CC) $(CFLAGS_PLUGIN) -o target/release/libcounter_c.so plugins/counter-c/counter.c
	$(CC) $(CFLAGS_PLUGIN) -pthread -o target/release/libdelay_c.so plugins/delay-c/delay.c

test:
	bash tests/install-deps.sh
	cargo test --workspace
