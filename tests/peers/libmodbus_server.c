/* A Modbus server built on libmodbus (Debian libmodbus-dev): a peer nobody on the project wrote,
 * with its own framing, its own exception rules and its own float encoders.
 *
 *   libmodbus_server tcp  [SPEC...]          listens on 127.0.0.1, a random port, printed first
 *   libmodbus_server rtu PATH UNIT [SPEC...]  a serial unit on PATH (19200 8N1), e.g. a pty
 *
 * SPEC sets the memory before serving (tables: hr, ir, co, di at 0..1999):
 *   hr=ADDR:V,V,...      16-bit registers (ir= likewise), decimal, may be negative
 *   co=ADDR:1,0,...      bits (di= likewise)
 * (libmodbus's own modbus_set_float_* are not used: in Debian's 3.1.6 their names do not say
 * the bytes' order on the wire of a little-endian host; libmodbus issues #611, #757.)
 *
 * Every request is printed on stdout as "REQ unit fc address count" (count 1 for the
 * single-write codes) and, after a write, the new contents as "HR address value..." or
 * "CO address bit...". Stdout is flushed per line: the test reads it as it goes. */
#include <errno.h>
#include <modbus.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

#define N 2000

static void die(const char *what) {
    fprintf(stderr, "libmodbus_server: %s: %s\n", what, modbus_strerror(errno));
    exit(2);
}

static void apply(modbus_mapping_t *m, const char *spec) {
    char table[8] = {0};
    int addr = 0, used = 0;
    if (sscanf(spec, "%7[a-z0-9]=%d:%n", table, &addr, &used) != 2 || addr < 0 || addr >= N) {
        fprintf(stderr, "libmodbus_server: bad spec %s\n", spec);
        exit(2);
    }
    const char *vals = spec + used;
    char *copy = strdup(vals), *save = NULL;
    int i = addr;
    for (char *tok = strtok_r(copy, ",", &save); tok && i < N; tok = strtok_r(NULL, ",", &save), i++) {
        long v = strtol(tok, NULL, 10);
        if (!strcmp(table, "hr")) m->tab_registers[i] = (uint16_t)v;
        else if (!strcmp(table, "ir")) m->tab_input_registers[i] = (uint16_t)v;
        else if (!strcmp(table, "co")) m->tab_bits[i] = v ? 1 : 0;
        else if (!strcmp(table, "di")) m->tab_input_bits[i] = v ? 1 : 0;
        else exit(2);
    }
    free(copy);
}

static void report(modbus_t *ctx, modbus_mapping_t *m, const uint8_t *q) {
    int h = modbus_get_header_length(ctx);
    int unit = q[h - 1], fc = q[h], addr = (q[h + 1] << 8) | q[h + 2];
    int count = (fc == 5 || fc == 6) ? 1 : ((q[h + 3] << 8) | q[h + 4]);
    printf("REQ %d %d %d %d\n", unit, fc, addr, count);
    if ((fc == 6 || fc == 16) && addr + count <= N) {
        printf("HR %d", addr);
        for (int i = 0; i < count; i++) printf(" %d", m->tab_registers[addr + i]);
        printf("\n");
    } else if ((fc == 5 || fc == 15) && addr + count <= N) {
        printf("CO %d", addr);
        for (int i = 0; i < count; i++) printf(" %d", m->tab_bits[addr + i]);
        printf("\n");
    }
    fflush(stdout);
}

static void serve(modbus_t *ctx, modbus_mapping_t *m) {
    uint8_t q[MODBUS_TCP_MAX_ADU_LENGTH];
    int rc = modbus_receive(ctx, q);
    if (rc > 0) {
        modbus_reply(ctx, q, rc, m);
        report(ctx, m, q);
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) return 2;
    int tcp = !strcmp(argv[1], "tcp"), first_spec = tcp ? 2 : 4;
    if (!tcp && (strcmp(argv[1], "rtu") || argc < 4)) return 2;
    modbus_mapping_t *m = modbus_mapping_new(N, N, N, N);
    if (!m) die("mapping");
    for (int i = first_spec; i < argc; i++) apply(m, argv[i]);

    if (!tcp) {
        modbus_t *ctx = modbus_new_rtu(argv[2], 19200, 'N', 8, 1);
        if (!ctx || modbus_set_slave(ctx, atoi(argv[3])) == -1 || modbus_connect(ctx) == -1) die("rtu");
        printf("READY\n");
        fflush(stdout);
        for (;;) serve(ctx, m);
    }

    modbus_t *ctx = modbus_new_tcp("127.0.0.1", 0);
    if (!ctx) die("tcp");
    int server = modbus_tcp_listen(ctx, 8);
    if (server == -1) die("listen");
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    getsockname(server, (struct sockaddr *)&a, &alen);
    printf("PORT %d\n", ntohs(a.sin_port));
    fflush(stdout);
    fd_set all;
    FD_ZERO(&all);
    FD_SET(server, &all);
    int top = server;
    for (;;) {
        fd_set ready = all;
        if (select(top + 1, &ready, NULL, NULL, NULL) == -1) {
            if (errno == EINTR) continue;
            die("select");
        }
        for (int fd = 0; fd <= top; fd++) {
            if (!FD_ISSET(fd, &ready)) continue;
            if (fd == server) {
                int c = accept(server, NULL, NULL);
                if (c >= 0) {
                    FD_SET(c, &all);
                    if (c > top) top = c;
                }
                continue;
            }
            modbus_set_socket(ctx, fd);
            uint8_t q[MODBUS_TCP_MAX_ADU_LENGTH];
            int rc = modbus_receive(ctx, q);
            if (rc > 0) {
                modbus_reply(ctx, q, rc, m);
                report(ctx, m, q);
            } else if (rc == -1) {
                close(fd);
                FD_CLR(fd, &all);
            }
        }
    }
}
