/*
 * daemonize.c -- test-only plugin whose init daemonizes the way a careless
 * plugin might: fork, setsid, fork again, and leave the grandchild running
 * (every signal it can block blocked, sleeping forever, no exec). It escapes
 * the process group nbnet gives the plugin checker, so only a child subreaper
 * that sweeps its children catches it (`nbnet --check`, `nbnet plugin run`).
 *
 * Config (optional):
 *   pid_file = "PATH"   the daemon writes its pid there before init returns
 */
#define _DEFAULT_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nbnet_plugin.h"

static void daemon_main(const char *pid_file, int ready) {
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    if (pid_file != NULL) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", pid_file);
        FILE *f = fopen(tmp, "w");
        if (f != NULL) {
            fprintf(f, "%ld\n", (long)getpid());
            fclose(f);
            rename(tmp, pid_file);
        }
    }
    (void)!write(ready, "x", 1);
    close(ready);
    for (;;) {
        sleep(1000);
    }
}

static int daemonize_init(const nbnet_init_ctx *ctx, void **state) {
    *state = NULL;
    const char *pid_file = ctx->config_get(ctx, "pid_file");
    int ready[2];
    if (pipe(ready) != 0) {
        static const char msg[] = "daemonize: pipe failed";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    pid_t first = fork();
    if (first == 0) {
        close(ready[0]);
        setsid();
        if (fork() == 0) {
            daemon_main(pid_file, ready[1]);
        }
        _exit(0);
    }
    close(ready[1]);
    /* Return once the daemon runs (and has written its pid). */
    char byte;
    while (first > 0 && read(ready[0], &byte, 1) < 0) {
    }
    close(ready[0]);
    if (first > 0) {
        waitpid(first, NULL, 0);
    }
    return NBNET_OK;
}

static int daemonize_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    return nbnet_write(resp, req, len);
}

static const nbnet_plugin daemonize_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "daemonize",
    .version = "0.1.0",
    .init = daemonize_init,
    .process = daemonize_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &daemonize_plugin; }
