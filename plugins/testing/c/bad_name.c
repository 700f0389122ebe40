/*
 * bad_name.c -- test-only plugin whose own name holds a terminal escape
 * sequence and a newline followed by a forged output line, and whose version
 * is 1 MiB of newlines. `nbnet plugin info` must print both escaped, on one
 * line each, and bounded.
 */
#include <string.h>

#include "nbnet_plugin.h"

static char huge_version[1 << 20];

static int bad_name_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static int bad_name_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    return nbnet_write(resp, req, len);
}

static nbnet_plugin bad_name_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "red\x1b[31m\nloadable: forged",
    .version = huge_version,
    .init = bad_name_init,
    .process = bad_name_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) {
    memset(huge_version, '\n', sizeof huge_version - 1);
    return &bad_name_plugin;
}
