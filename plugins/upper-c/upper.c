/*
 * upper.c -- the `upper` plugin in C: answers with the request in ASCII upper
 * case ("hi" -> "HI"). Build (from the repository root):
 *
 *   cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
 *      -I plugin-api/include -o target/libupper_c.so plugins/upper-c/upper.c
 *
 * The answer is computed straight into the host's buffer, in the window
 * resp->data[len..cap): no copy, no allocation, and -- since the host offers
 * room for a response the size of the request -- no call into the host.
 */
#include "nbnet_plugin.h"

static int upper_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL; /* no per-worker state */
    return NBNET_OK;
}

static int upper_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    if (nbnet_ensure(resp, len) != NBNET_OK) {
        static const char msg[] = "response refused: over max_frame_bytes";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    uint8_t *out = resp->data + resp->len;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = req[i];
        out[i] = (c >= 'a' && c <= 'z') ? (uint8_t)(c - 'a' + 'A') : c;
    }
    resp->len += len; /* the bytes are written: they are the answer */
    return NBNET_OK;
}

static const nbnet_plugin upper_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "upper-c",
    .version = "0.1.0",
    .init = upper_init,
    .process = upper_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL, /* ABI 1.1: optional, see nbnet_plugin.h */
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &upper_plugin; }
