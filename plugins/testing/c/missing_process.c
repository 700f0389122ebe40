/*
 * missing_process.c -- test-only plugin: a correct ABI version but a NULL
 * `process`, which nbnet_plugin.h marks as required. The host must refuse it
 * at load time rather than crash on the first request.
 */
#include "nbnet_plugin.h"

static int missing_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static const nbnet_plugin missing_process_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "missing-process",
    .version = "0.1.0",
    .init = missing_init,
    .process = NULL,
    .destroy = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &missing_process_plugin; }
