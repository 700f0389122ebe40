/*
 * echo.c -- the smallest nbnet plugin in C: every response is its request.
 * Build (from the repository root):
 *
 *   cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
 *      -I plugin-api/include -o target/release/libecho_c.so plugins/echo-c/echo.c
 *
 * It keeps no state, so init stores NULL and there is no destroy. The same
 * file also builds as C++ (add `-x c++ -std=c++20` and use c++).
 */
#include "nbnet_plugin.h"

static int echo_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static int echo_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    /* NBNET_ERR here means the answer would exceed max_frame_bytes; the host
     * then closes the connection (it needs no message, but a message helps). */
    if (nbnet_write(resp, req, len) != NBNET_OK) {
        static const char msg[] = "response too large";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    return NBNET_OK;
}

/* Every field, in declaration order: C++20 designated initializers require
 * the order, and g++ -Wextra warns about fields left out (C would make them
 * NULL silently). */
static const nbnet_plugin echo_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "echo-c",
    .version = "0.1.0",
    .init = echo_init,
    .process = echo_process,
    .destroy = NULL, /* no state to free */
    .on_open = NULL, /* hooks: not interested */
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL, /* ABI 1.1: optional, see nbnet_plugin.h */
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &echo_plugin; }
