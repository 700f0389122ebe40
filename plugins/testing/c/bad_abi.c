/*
 * bad_abi.c -- test-only plugin: a well-formed C plugin that claims ABI major
 * 99. The host must refuse to load it (and say which file) instead of calling
 * into a table whose layout it cannot know.
 */
#include "nbnet_plugin.h"

static int bad_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static int bad_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    return nbnet_write(resp, req, len);
}

static const nbnet_plugin bad_abi_plugin = {
    .abi_major = 99,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "bad-abi",
    .version = "0.1.0",
    .init = bad_init,
    .process = bad_process,
    .destroy = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &bad_abi_plugin; }
