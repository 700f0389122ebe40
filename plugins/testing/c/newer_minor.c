/*
 * newer_minor.c -- test-only plugin: right ABI major, but built for a newer
 * minor than the host knows (NBNET_ABI_MINOR + 1). nbnet_plugin.h says a host
 * refuses such a plugin, since it may rely on host features the host lacks.
 */
#include "nbnet_plugin.h"

static int newer_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static int newer_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    return nbnet_write(resp, req, len);
}

static const nbnet_plugin newer_minor_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR + 1,
    .struct_size = sizeof(nbnet_plugin),
    .name = "newer-minor",
    .version = "0.1.0",
    .init = newer_init,
    .process = newer_process,
    .destroy = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &newer_minor_plugin; }
