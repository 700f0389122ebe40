/*
 * whoami.c -- test-only plugin: answers "<worker pid> <peer> <listener>",
 * what the host says about the connection. The load-balancer test uses it to
 * see which nbnet served a request and whether the PROXY protocol delivered
 * the real client's address. The request "ids" is answered
 * "uid=<real> euid=<effective> gid=<real> egid=<effective> groups=<count>":
 * the security tests check what user plugin code runs as. The request "tls"
 * is answered "tls=<0|1> version=<hex> subject=<...> sans=<...>" (ABI 1.3
 * TLS facts; "-" for a NULL string).
 */
#include <stdio.h>
#include <unistd.h>

#include "nbnet_plugin.h"

static int whoami_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static int whoami_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    char text[512];
    if (len == 3 && req[0] == 'i' && req[1] == 'd' && req[2] == 's') {
        int groups = getgroups(0, NULL);
        int m = snprintf(text, sizeof text, "uid=%ld euid=%ld gid=%ld egid=%ld groups=%d",
                         (long)getuid(), (long)geteuid(), (long)getgid(), (long)getegid(), groups);
        return nbnet_write(resp, text, (size_t)m);
    }
    if (len == 3 && req[0] == 't' && req[1] == 'l' && req[2] == 's') {
        const nbnet_conn *c = resp->conn;
        int m = snprintf(text, sizeof text, "tls=%d version=%04x subject=%s sans=%s",
                         (c->flags & NBNET_CONN_TLS) ? 1 : 0, (unsigned)c->tls_version,
                         c->tls_subject ? c->tls_subject : "-", c->tls_sans ? c->tls_sans : "-");
        if (m < 0 || (size_t)m >= sizeof text) {
            static const char msg[] = "whoami: TLS facts too long";
            return nbnet_error(resp, msg, sizeof msg - 1);
        }
        return nbnet_write(resp, text, (size_t)m);
    }
    int n = snprintf(text, sizeof text, "%ld %s %s", (long)getpid(), resp->conn->peer,
                     resp->conn->listener);
    if (n < 0 || (size_t)n >= sizeof text) {
        static const char msg[] = "whoami: address too long";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    return nbnet_write(resp, text, (size_t)n);
}

static const nbnet_plugin whoami_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "whoami",
    .version = "0.1.0",
    .init = whoami_init,
    .process = whoami_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL, /* ABI 1.1: optional, see nbnet_plugin.h */
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &whoami_plugin; }
