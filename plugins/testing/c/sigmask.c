/*
 * sigmask.c -- test-only plugin: starts a child process the way plugins
 * do and answers with that child's signal state, the "SigBlk:" (blocked)
 * and "SigIgn:" (ignored) lines of its /proc/self/status. The operator
 * tests (tests/operator.rs) check that a plugin's children start with
 * nothing blocked or ignored, so that SIGTERM stops them.
 *
 * The request picks how the child is started:
 *   "fork"     fork(); the child reads its own status (no exec) and writes
 *              the lines to a pipe, then _exit(0)
 *   "system"   system("grep ... /proc/self/status >&FD"): the shell's state
 *   "popen"    popen("grep ... /proc/self/status", "r"): the shell's state
 *   "self"     the worker's own lines (no child)
 */
#define _DEFAULT_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nbnet_plugin.h"

/* The SigBlk and SigIgn lines of /proc/self/status, into out. */
static size_t own_signal_lines(char *out, size_t cap) {
    size_t used = 0;
    FILE *status = fopen("/proc/self/status", "r");
    if (status == NULL) {
        return 0;
    }
    char line[256];
    while (fgets(line, sizeof line, status) != NULL) {
        if (strncmp(line, "SigBlk:", 7) == 0 || strncmp(line, "SigIgn:", 7) == 0) {
            size_t n = strlen(line);
            if (used + n < cap) {
                memcpy(out + used, line, n);
                used += n;
            }
        }
    }
    fclose(status);
    return used;
}

/* Reads what is in the pipe's read end until EOF, into out. */
static size_t drain(int fd, char *out, size_t cap) {
    size_t used = 0;
    for (;;) {
        ssize_t n = read(fd, out + used, cap - used);
        if (n <= 0 || (used += (size_t)n) == cap) {
            return used;
        }
    }
}

static int sigmask_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

#define GREP "grep -E '^Sig(Blk|Ign):' /proc/self/status"

static int sigmask_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    char text[1024];
    size_t used = 0;
    if (len == 4 && memcmp(req, "self", 4) == 0) {
        used = own_signal_lines(text, sizeof text);
    } else if (len == 4 && memcmp(req, "fork", 4) == 0) {
        int fds[2];
        if (pipe(fds) != 0) {
            return nbnet_error(resp, "pipe failed", 11);
        }
        pid_t pid = fork();
        if (pid == 0) {
            char mine[512];
            size_t n = own_signal_lines(mine, sizeof mine);
            ssize_t w = write(fds[1], mine, n);
            _exit(w == (ssize_t)n ? 0 : 1);
        }
        close(fds[1]);
        used = drain(fds[0], text, sizeof text);
        close(fds[0]);
        waitpid(pid, NULL, 0);
    } else if (len == 6 && memcmp(req, "system", 6) == 0) {
        int fds[2];
        if (pipe(fds) != 0) {
            return nbnet_error(resp, "pipe failed", 11);
        }
        char command[256];
        /* Through /proc: sh redirects only descriptors 0..9 by number. */
        snprintf(command, sizeof command, GREP " > /proc/self/fd/%d", fds[1]);
        int rc = system(command);
        close(fds[1]);
        used = drain(fds[0], text, sizeof text);
        close(fds[0]);
        if (rc != 0) {
            return nbnet_error(resp, "system failed", 13);
        }
    } else if (len == 5 && memcmp(req, "popen", 5) == 0) {
        FILE *child = popen(GREP, "r");
        if (child == NULL) {
            return nbnet_error(resp, "popen failed", 12);
        }
        used = fread(text, 1, sizeof text, child);
        pclose(child);
    } else {
        return nbnet_write(resp, req, len);
    }
    return nbnet_write(resp, text, used);
}

static const nbnet_plugin sigmask_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "sigmask",
    .version = "0.1.0",
    .init = sigmask_init,
    .process = sigmask_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &sigmask_plugin; }
