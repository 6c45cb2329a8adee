/*
 * sendmail: the native client of the sendmail-shim mail gate.
 *
 * On a shared server every message goes through the gate (sendmail-shim
 * serve), which runs as its own user, owns the ledger, the queue and the relay
 * credentials, and learns the caller from the kernel.  This program only
 * frames argv and stdin as sendmail_shim/gate_protocol.py documents (that file
 * is the one description of the protocol), prints the verdict's line on
 * stderr and exits with its code.  It holds no secret and decides nothing.
 *
 * Everything else -- no [gate] socket configured or no socket there, -b modes
 * (-bs is an SMTP dialogue), --help, --version, a config it cannot read
 * plainly -- is handed to the Python front end by exec, with the same argv and
 * stdin untouched, so that behaviour is identical.  That program's path is
 * fixed when this one is built (FRONT_END): nothing in the environment or on
 * the command line chooses what runs, and nothing named on the command line is
 * ever read, written or run.
 *
 * The client contract shared with sendmail_shim/gate_client.py: the config
 * rules of gate_client.plain_gate_table, the argument list bounds, the connect
 * retry while the listen backlog is full, the SO_PEERCRED check of the peer
 * before one byte is exchanged, and the same stderr lines, byte for byte.
 *
 * C99 and libc only.  Memory is bounded (one frame at a time), every wait is
 * a poll() with a deadline, EINTR is retried and SIGPIPE ignored, so a gate
 * that goes away gives a line, not a silent death.
 */
#define _GNU_SOURCE /* struct ucred */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#ifndef FRONT_END
#error "build with -DFRONT_END='\"/usr/lib/sendmail-shim/sendmail\"' (see native/Makefile)"
#endif

#define PROGRAM "sendmail"
#define CONFIG_ENV "SENDMAIL_SHIM_CONFIG"
#define DEFAULT_CONFIG "/etc/sendmail-shim/config.toml"
#define DEFAULT_TIMEOUT 120.0
#define CONFIG_MAX (64 * 1024) /* a larger config is read by the front end */

/* gate_protocol.py: frame types, their largest payloads, the request bounds. */
#define T_GREETING 'G'
#define T_ARG 'A'
#define T_DATA 'D'
#define T_END 'E'
#define T_VERDICT 'V'
#define HEADER_SIZE 5
#define MAX_GREETING 64
#define MAX_ARG 8192
#define MAX_DATA (64 * 1024)
#define MAX_VERDICT 4096
#define MAX_ARGS 4096
#define MAX_ARGV_BYTES (256 * 1024)
#define GREETING_TEXT "sendmail-shim-gate 1"
/* gate_client.OUTCOME_UNKNOWN, word for word */
#define OUTCOME_UNKNOWN "outcome unknown: the mail gate closed the connection after receiving the whole message " \
    "and before answering; the message may have been sent: do not send it again before " \
    "checking with the administrator (sendmail-shim log)"

/* Connect retry while the gate's listen backlog is full. */
#define FIRST_WAIT 0.005
#define LONGEST_WAIT 0.2

struct target {
    char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
    double timeout;
    char user[256]; /* [gate] user; empty: the socket file's owner is the gate */
};

/* RESET: the gate closed with part of the request unread (AF_UNIX reports ECONNRESET then),
 * so it never had the whole message; CLOSED: an orderly end. */
enum status { OK, CLOSED, RESET, TIMED_OUT, BAD_FRAME, FAILED };

static unsigned char frame_buf[HEADER_SIZE + MAX_DATA + HEADER_SIZE];
static unsigned char reply_buf[MAX_VERDICT];
static char config_text[CONFIG_MAX + 1];
static char bad_frame[256]; /* why a frame was refused, as gate_protocol says it */
static int saved_errno;

/* ------------------------------------------------------------------ output */

static void say_bytes(const char *text, size_t len)
{
    while (len > 0) {
        ssize_t done = write(STDERR_FILENO, text, len);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            return; /* nowhere to say it: the exit code still tells */
        text += done;
        len -= (size_t)done;
    }
}

/* "sendmail: LINE\n" on stderr, then exit with code. */
__attribute__((format(printf, 2, 3), noreturn))
static void finish(int code, const char *format, ...)
{
    static char line[16 * 1024];
    int len = snprintf(line, sizeof line, "%s: ", PROGRAM);
    va_list args;
    va_start(args, format);
    int more = vsnprintf(line + len, sizeof line - (size_t)len - 1, format, args);
    va_end(args);
    if (more < 0)
        more = 0;
    len += more;
    if ((size_t)len > sizeof line - 2)
        len = (int)sizeof line - 2;
    line[len++] = '\n';
    say_bytes(line, (size_t)len);
    exit(code);
}

/* Python's repr() of a bytes object, as gate_client's lines quote payloads. */
static void bytes_repr(const unsigned char *data, size_t len, char *out, size_t size)
{
    int quote = memchr(data, '\'', len) && !memchr(data, '"', len) ? '"' : '\'';
    size_t at = 0;
    if (size < 8)
        return;
    out[at++] = 'b';
    out[at++] = (char)quote;
    for (size_t i = 0; i < len && at + 6 < size; i++) {
        unsigned char c = data[i];
        if (c == quote || c == '\\')
            at += (size_t)snprintf(out + at, size - at, "\\%c", c);
        else if (c == '\t' || c == '\n' || c == '\r')
            at += (size_t)snprintf(out + at, size - at, "\\%c", c == '\t' ? 't' : c == '\n' ? 'n' : 'r');
        else if (c < 0x20 || c >= 0x7f)
            at += (size_t)snprintf(out + at, size - at, "\\x%02x", c);
        else
            out[at++] = (char)c;
    }
    out[at++] = (char)quote;
    out[at] = '\0';
}

/* ------------------------------------------------------------------ the front end */

__attribute__((noreturn))
static void run_front_end(char **argv)
{
    static char *fallback[] = {PROGRAM, NULL};
    execv(FRONT_END, argv[0] ? argv : fallback);
    finish(EX_UNAVAILABLE, "not sent: the sendmail-shim front end %s cannot be run (%s); "
           "tell the administrator", FRONT_END, strerror(errno));
}

/* gate_client.needs_full_front_end: -b modes, --help, --version (getopt's rules). */
static int needs_front_end(int argc, char **argv)
{
    for (int index = 1; index < argc; index++) {
        const char *word = argv[index];
        if (!strcmp(word, "--help") || !strcmp(word, "--version"))
            return 1;
        if (!strcmp(word, "--") || word[0] != '-' || !strcmp(word, "-"))
            return 0; /* the rest are recipients */
        for (size_t at = 1; word[at]; at++) {
            if (word[at] == 'b')
                return 1;
            if (strchr("frFbBNRVoOLhA", word[at])) {
                if (!word[at + 1])
                    index++; /* the value is the next word */
                break;
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ the config */

/* How many continuation bytes follow this UTF-8 lead byte; 0 for a byte that cannot lead. */
static size_t continuation_bytes(unsigned char c)
{
    return c >= 0xc2 && c <= 0xdf ? 1 : c >= 0xe0 && c <= 0xef ? 2 : c >= 0xf0 && c <= 0xf4 ? 3 : 0;
}

/*
 * Only text that Python's str.strip() and str.splitlines() read exactly as
 * this program does: valid UTF-8 (as Python decodes it), no control character
 * but tab and line ends, none of Unicode's other spaces or line separators.
 */
static int plain_text(const unsigned char *text, size_t len)
{
    for (size_t i = 0; i < len;) {
        unsigned char c = text[i];
        if (c < 0x80) {
            if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
                return 0;
            i++;
            continue;
        }
        size_t need = continuation_bytes(c);
        if (!need || len - i <= need)
            return 0;
        unsigned char lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
        unsigned char hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
        if (text[i + 1] < lo || text[i + 1] > hi)
            return 0;
        uint32_t point = c & (need == 1 ? 0x1f : need == 2 ? 0x0f : 0x07);
        for (size_t k = 1; k <= need; k++) {
            if (k > 1 && (text[i + k] & 0xc0) != 0x80)
                return 0;
            point = point << 6 | (text[i + k] & 0x3f);
        }
        if (point == 0x85 || point == 0xa0 || point == 0x1680 || (point >= 0x2000 && point <= 0x200a) ||
            point == 0x2028 || point == 0x2029 || point == 0x202f || point == 0x205f || point == 0x3000)
            return 0;
        i += need + 1;
    }
    return 1;
}

static int blank(char c) { return c == ' ' || c == '\t'; }

/* str.strip() of [*start, *end), for text plain_text accepted. */
static void strip(char **start, char **end)
{
    while (*start < *end && blank(**start))
        (*start)++;
    while (*end > *start && blank((*end)[-1]))
        (*end)--;
}

static int equals(const char *start, const char *end, const char *word)
{
    size_t len = strlen(word);
    return (size_t)(end - start) == len && !memcmp(start, word, len);
}

static int starts(const char *start, const char *end, const char *word)
{
    size_t len = strlen(word);
    return (size_t)(end - start) >= len && !memcmp(start, word, len);
}

enum kind { NONE, STRING, NUMBER, BOOLEAN };
struct value { enum kind kind; char *start, *end; double number; };

/* gate_client._plain_value: a quoted string without escapes, true/false, or a plain number. */
static struct value plain_value(char *start, char *end)
{
    struct value v = {NONE, start, end, 0};
    if (start < end && (*start == '"' || *start == '\'')) {
        char *close = memchr(start + 1, *start, (size_t)(end - start - 1));
        if (!close || memchr(start, '\\', (size_t)(close - start)))
            return v;
        char *rest = close + 1, *rest_end = end;
        strip(&rest, &rest_end);
        if (rest < rest_end && *rest != '#')
            return v;
        v.kind = STRING, v.start = start + 1, v.end = close;
        return v;
    }
    char *bare_end = memchr(start, '#', (size_t)(end - start));
    bare_end = bare_end ? bare_end : end;
    strip(&start, &bare_end);
    if (equals(start, bare_end, "true") || equals(start, bare_end, "false")) {
        v.kind = BOOLEAN;
        return v;
    }
    int dots = 0, digits = 0;
    for (char *c = start; c < bare_end; c++) {
        if (*c == '.' && !dots++)
            continue;
        if (*c < '0' || *c > '9')
            return v;
        digits++;
    }
    if (!digits || bare_end[-1] == '.')
        return v;
    char saved = *bare_end;
    *bare_end = '\0';
    v.kind = NUMBER, v.number = strtod(start, NULL);
    *bare_end = saved;
    return v;
}

struct gate_table { int found; struct value socket, timeout, user; };

/* One line of the file (already stripped): 1 to go on, 0 when only tomllib can read the file. */
static int table_line(struct gate_table *table, char **section, char **section_end, char *line, char *end)
{
    if (line == end || *line == '#')
        return 1;
    if (*line == '[') {
        /* The header with every blank removed, up to a comment. */
        char *out = line;
        for (char *c = line; c < end && *c != '#'; c++)
            if (!blank(*c))
                *out++ = *c;
        *section = line, *section_end = out;
        if (starts(line, out, "[gate.") || starts(line, out, "[[gate") ||
            (equals(line, out, "[gate]") && table->found))
            return 0;
        table->found |= equals(line, out, "[gate]");
        return 1;
    }
    char *sign = memchr(line, '=', (size_t)(end - line));
    char *key = line, *key_end = sign ? sign : end;
    strip(&key, &key_end);
    if (*section && equals(*section, *section_end, "[gate]")) {
        if (!sign)
            return 0;
        char *text = sign + 1, *text_end = end;
        strip(&text, &text_end);
        struct value v = plain_value(text, text_end);
        if (v.kind == NONE)
            return 0;
        if (equals(key, key_end, "socket"))
            table->socket = v;
        else if (equals(key, key_end, "request_timeout"))
            table->timeout = v;
        else if (equals(key, key_end, "user"))
            table->user = v;
        return 1;
    }
    if (!*section) {
        /* A top-level key: ``gate = {...}`` or ``gate.socket = ...`` would define [gate]. */
        if (!sign)
            return 0;
        char *head = key, *head_end = memchr(key, '.', (size_t)(key_end - key));
        head_end = head_end ? head_end : key_end;
        while (head < head_end && strchr("\"' ", *head))
            head++;
        while (head_end > head && strchr("\"' ", head_end[-1]))
            head_end--;
        if (equals(head, head_end, "gate"))
            return 0;
    }
    return 1;
}

/* gate_client.plain_gate_table over the file's text; 0 when the front end must read it. */
static int gate_table(char *text, size_t len, struct gate_table *table)
{
    if (strstr(text, "\"\"\"") || strstr(text, "'''") || !plain_text((unsigned char *)text, len))
        return 0;
    char *section = NULL, *section_end = NULL;
    char *line = text, *stop = text + len;
    while (line < stop) {
        char *end = line;
        while (end < stop && *end != '\n' && *end != '\r')
            end++;
        char *next = end < stop && *end == '\r' && end + 1 < stop && end[1] == '\n' ? end + 2 :
                     end < stop ? end + 1 : end;
        char *start = line;
        strip(&start, &end);
        if (!table_line(table, &section, &section_end, start, end))
            return 0;
        line = next;
    }
    return table->found;
}

/* [gate] from the config file, or 0 when the front end must take this call. */
static int read_target(struct target *target)
{
    const char *path = getenv(CONFIG_ENV);
    if (!path || !*path)
        path = DEFAULT_CONFIG;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return 0;
    struct stat info;
    size_t len = 0;
    int fits = fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_size <= CONFIG_MAX;
    while (fits) {
        ssize_t got = read(fd, config_text + len, CONFIG_MAX + 1 - len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            fits = got == 0;
            break;
        }
        len += (size_t)got;
        fits = len <= CONFIG_MAX;
    }
    close(fd);
    if (!fits || memchr(config_text, '\0', len))
        return 0;
    config_text[len] = '\0';
    struct gate_table table = {0};
    if (!gate_table(config_text, len, &table))
        return 0;
    struct value *s = &table.socket, *t = &table.timeout, *u = &table.user;
    size_t socket_len = (size_t)(s->end - s->start), user_len = (size_t)(u->end - u->start);
    if (s->kind != STRING || !socket_len || *s->start != '/' || socket_len >= sizeof target->socket ||
        memchr(s->start, '\0', socket_len))
        return 0;
    if (t->kind != NONE && (t->kind != NUMBER || !(t->number >= 1 && t->number <= 3600)))
        return 0;
    if (u->kind != NONE && (u->kind != STRING || !user_len || user_len >= sizeof target->user))
        return 0;
    memcpy(target->socket, s->start, socket_len);
    target->socket[socket_len] = '\0';
    target->timeout = t->kind == NUMBER ? t->number : DEFAULT_TIMEOUT;
    if (u->kind == STRING)
        memcpy(target->user, u->start, user_len);
    target->user[u->kind == STRING ? user_len : 0] = '\0';
    return 1;
}

/* ------------------------------------------------------------------ time and waiting */

static double now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int ms_until(double deadline)
{
    double left = (deadline - now()) * 1000;
    return left <= 0 ? 0 : left >= INT_MAX ? INT_MAX : (int)left + 1;
}

/* A factor in [0.5, 1.5): the waits of many callers must not stay in step. */
static double jitter(void)
{
    static uint64_t state;
    if (!state) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        state = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40) ^ 0x9e3779b97f4a7c15u;
    }
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return 0.5 + (double)(state >> 11) / 9007199254740992.0;
}

/* Seconds as gate_client prints them: Python's %g of the value rounded to 0.1. */
static const char *tenths(double seconds)
{
    static char text[32];
    long count = (long)(seconds * 10 + 0.5);
    if (count % 10)
        snprintf(text, sizeof text, "%ld.%ld", count / 10, count % 10);
    else
        snprintf(text, sizeof text, "%ld", count / 10);
    return text;
}

/* ------------------------------------------------------------------ connecting */

/*
 * One connect. The first is non-blocking; later ones wait up to `wait` seconds
 * inside connect() itself (SO_SNDTIMEO): the kernel hands each slot that frees
 * in a full backlog to a connect already waiting, so a caller that slept
 * between tries would lose every slot to a flood of blocking connects.
 * The socket returned is non-blocking either way.
 */
static int connect_once(const struct sockaddr_un *address, double wait)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (wait > 0 ? 0 : SOCK_NONBLOCK), 0);
    if (fd < 0)
        return -1;
    if (wait > 0) {
        struct timeval limit = {(time_t)wait, (suseconds_t)((wait - (double)(time_t)wait) * 1e6)};
        if (limit.tv_sec == 0 && limit.tv_usec == 0)
            limit.tv_usec = 1000;
        if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit) != 0)
            goto failed;
    }
    while (connect(fd, (const struct sockaddr *)address, sizeof *address) != 0) {
        if (errno != EINTR)
            goto failed;
    }
    if (wait > 0) {
        int flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)
            goto failed;
    }
    return fd;
failed:
    saved_errno = errno;
    close(fd);
    errno = saved_errno;
    return -1;
}

/* The connected socket; a full backlog is waited out with jittered backoff until the timeout. */
static int connect_gate(const struct target *target)
{
    struct sockaddr_un address;
    memset(&address, 0, sizeof address);
    address.sun_family = AF_UNIX;
    memcpy(address.sun_path, target->socket, strlen(target->socket) + 1);
    double started = now(), wait = FIRST_WAIT, pause = 0;
    for (;;) {
        int fd = connect_once(&address, pause);
        if (fd >= 0)
            return fd;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINPROGRESS)
            finish(EX_UNAVAILABLE, "not sent: the mail gate is not running (cannot connect to %s: %s); "
                   "try again later, and tell the administrator if it persists", target->socket, strerror(errno));
        double waited = now() - started;
        if (waited >= target->timeout)
            finish(EX_UNAVAILABLE, "not sent: the mail gate at %s is busy (no connection slot for %s s); "
                   "try again in a moment", target->socket, tenths(waited));
        pause = wait * jitter();
        if (pause > target->timeout - waited)
            pause = target->timeout - waited;
        wait = wait * 2 < LONGEST_WAIT ? wait * 2 : LONGEST_WAIT;
    }
}

/* The peer must be root or the gate's user, before one byte goes either way. */
static void check_peer(int fd, const struct target *target)
{
    struct ucred peer;
    socklen_t len = sizeof peer;
    uid_t gate_uid;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0)
        finish(EX_UNAVAILABLE, "not sent: talking to the mail gate failed (%s); try again later", strerror(errno));
    if (target->user[0]) {
        struct passwd *entry = getpwnam(target->user);
        if (!entry) {
            close(fd);
            finish(EX_CONFIG, "not sent: configuration error: [gate] user: no Unix user named %s; "
                   "the administrator must fix it", target->user);
        }
        gate_uid = entry->pw_uid;
    } else {
        struct stat info;
        if (stat(target->socket, &info) != 0)
            finish(EX_UNAVAILABLE, "not sent: talking to the mail gate failed (%s); try again later",
                   strerror(errno));
        gate_uid = info.st_uid;
    }
    if (peer.uid != 0 && peer.uid != gate_uid) {
        close(fd);
        finish(EX_UNAVAILABLE, "not sent: the process answering on %s runs as uid %lu, not as the mail gate's "
               "user (uid %lu); nothing was sent; tell the administrator", target->socket,
               (unsigned long)peer.uid, (unsigned long)gate_uid);
    }
}

/* ------------------------------------------------------------------ frames */

/* Wait until fd is ready for events (or a verdict is readable); 0 when the deadline passed. */
static int wait_for(int fd, short events, double deadline, short *got)
{
    struct pollfd want = {fd, events, 0};
    for (;;) {
        int ready = poll(&want, 1, ms_until(deadline));
        if (ready > 0) {
            *got = want.revents;
            return 1;
        }
        if (ready == 0)
            return 0;
        if (errno != EINTR) {
            *got = POLLERR;
            return 1;
        }
    }
}

static enum status read_exactly(int fd, unsigned char *into, size_t size, double deadline)
{
    size_t got = 0;
    while (got < size) {
        ssize_t count = recv(fd, into + got, size - got, 0);
        if (count > 0) {
            got += (size_t)count;
            continue;
        }
        if (count == 0)
            return CLOSED;
        if (errno == ECONNRESET)
            return RESET;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return saved_errno = errno, FAILED;
        short events;
        if (!wait_for(fd, POLLIN, deadline, &events))
            return TIMED_OUT;
    }
    return OK;
}

static size_t payload_limit(int kind)
{
    switch (kind) {
    case T_GREETING: return MAX_GREETING;
    case T_ARG: return MAX_ARG;
    case T_DATA: return MAX_DATA;
    case T_END: return 0;
    case T_VERDICT: return MAX_VERDICT;
    default: return SIZE_MAX;
    }
}

/* gate_protocol.read_frame: the length is checked before any payload is read. */
static enum status read_frame(int fd, double deadline, const char *expected, int *kind, size_t *len)
{
    unsigned char header[HEADER_SIZE];
    enum status status = read_exactly(fd, header, sizeof header, deadline);
    if (status != OK)
        return status;
    *kind = header[0];
    *len = (size_t)header[1] << 24 | (size_t)header[2] << 16 | (size_t)header[3] << 8 | header[4];
    if (payload_limit(*kind) == SIZE_MAX || !*kind || !strchr(expected, *kind)) {
        char shown[16], wanted[16];
        bytes_repr(header, 1, shown, sizeof shown);
        bytes_repr((const unsigned char *)expected, strlen(expected), wanted, sizeof wanted);
        snprintf(bad_frame, sizeof bad_frame, "unexpected frame type %s (expected one of %s)", shown, wanted);
        return BAD_FRAME;
    }
    if (*len > payload_limit(*kind)) {
        snprintf(bad_frame, sizeof bad_frame, "a %c frame of %zu bytes is over the limit of %zu", *kind, *len,
                 payload_limit(*kind));
        return BAD_FRAME;
    }
    return read_exactly(fd, reply_buf, *len, deadline);
}

/* Write it all; stops early (1) when the gate has a verdict ready before we finished. */
static enum status send_all(int fd, const unsigned char *data, size_t len, double timeout, int *answered)
{
    double deadline = now() + timeout;
    while (len > 0) {
        ssize_t done = send(fd, data, len, MSG_NOSIGNAL);
        if (done > 0) {
            data += done;
            len -= (size_t)done;
            continue;
        }
        if (done < 0 && (errno == EPIPE || errno == ECONNRESET))
            return CLOSED;
        if (done < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
            return saved_errno = errno, FAILED;
        short events = 0;
        if (!wait_for(fd, POLLOUT | POLLIN, deadline, &events))
            return saved_errno = ETIMEDOUT, FAILED;
        if (events & POLLIN) {
            *answered = 1; /* refused mid-way (too large, too slow): the rest goes unsent */
            return OK;
        }
    }
    return OK;
}

static size_t put_header(unsigned char *at, int kind, size_t len)
{
    at[0] = (unsigned char)kind;
    at[1] = (unsigned char)(len >> 24), at[2] = (unsigned char)(len >> 16);
    at[3] = (unsigned char)(len >> 8), at[4] = (unsigned char)len;
    return HEADER_SIZE;
}

/* ------------------------------------------------------------------ the request */

static const char *program_name(int argc, char **argv)
{
    if (argc < 1 || !argv[0])
        return PROGRAM;
    const char *slash = strrchr(argv[0], '/');
    const char *name = slash ? slash + 1 : argv[0];
    return *name ? name : PROGRAM;
}

/* Rule 1 of the client contract: nothing is connected for an argument list the gate refuses. */
static void check_argv(int argc, char **argv, const char *name)
{
    size_t count = 1, total = strlen(name), longest = total;
    for (int i = 1; i < argc; i++, count++) {
        size_t len = strlen(argv[i]);
        total += len;
        longest = len > longest ? len : longest;
    }
    if (total > MAX_ARGV_BYTES)
        finish(EX_USAGE, "argument list too long (%zu bytes; at most %d)", total, MAX_ARGV_BYTES);
    if (count > MAX_ARGS)
        finish(EX_USAGE, "argument list too long (%zu arguments; at most %d)", count, MAX_ARGS);
    if (longest > MAX_ARG)
        finish(EX_USAGE, "argument list too long (one argument of %zu bytes; at most %d)", longest, MAX_ARG);
}

/* The ARG frames, several to a write. */
static enum status send_args(int fd, int argc, char **argv, const char *name, double timeout, int *answered)
{
    size_t used = 0;
    for (int i = 0; i < argc; i++) {
        const char *word = i == 0 ? name : argv[i];
        size_t len = strlen(word);
        if (used + HEADER_SIZE + len > sizeof frame_buf) {
            enum status status = send_all(fd, frame_buf, used, timeout, answered);
            if (status != OK || *answered)
                return status;
            used = 0;
        }
        used += put_header(frame_buf + used, T_ARG, len);
        memcpy(frame_buf + used, word, len);
        used += len;
    }
    return send_all(fd, frame_buf, used, timeout, answered);
}

/*
 * Fill one DATA frame's payload from stdin, as Python's buffered read(64 KiB)
 * does: full frames until the last.  While waiting for the writer, a verdict
 * (the gate gave up waiting) ends the wait.
 */
static enum status read_stdin(int fd, size_t *len, int *eof, int *answered, double deadline)
{
    unsigned char *into = frame_buf + HEADER_SIZE;
    *len = 0;
    while (*len < MAX_DATA) {
        struct pollfd both[2] = {{STDIN_FILENO, POLLIN, 0}, {fd, POLLIN, 0}};
        int ready = poll(both, 2, ms_until(deadline));
        if (ready == 0)
            return saved_errno = ETIMEDOUT, FAILED;
        if (ready < 0 && errno != EINTR)
            return saved_errno = errno, FAILED;
        if (ready < 0)
            continue;
        if (!both[0].revents && both[1].revents) {
            *answered = 1; /* the writer is silent and the gate has spoken (it gave up waiting) */
            return OK;
        }
        ssize_t got = read(STDIN_FILENO, into + *len, MAX_DATA - *len);
        if (got > 0) {
            *len += (size_t)got;
            continue;
        }
        if (got == 0) {
            *eof = 1;
            return OK;
        }
        if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
            return saved_errno = errno, FAILED;
    }
    return OK;
}

static int verdict_waiting(int fd)
{
    struct pollfd want = {fd, POLLIN, 0};
    return poll(&want, 1, 0) > 0;
}

/* ARG..., DATA..., END; *answered when the gate spoke before the end. */
static enum status send_request(int fd, int argc, char **argv, const char *name, const struct target *target,
                                int *answered)
{
    enum status status = send_args(fd, argc, argv, name, target->timeout, answered);
    /* The gate bounds the whole request by request_timeout; a stuck writer on stdin is cut off with it. */
    double deadline = now() + target->timeout + 5;
    int eof = 0;
    while (status == OK && !*answered && !eof) {
        size_t len;
        status = read_stdin(fd, &len, &eof, answered, deadline);
        if (status != OK || *answered)
            break;
        /* The payload is already in place behind the header; END rides with the last piece. */
        size_t used = len ? put_header(frame_buf, T_DATA, len) + len : 0;
        if (eof)
            used += put_header(frame_buf + used, T_END, 0);
        status = send_all(fd, frame_buf, used, target->timeout, answered);
        if (status == OK && !eof && verdict_waiting(fd))
            *answered = 1;
    }
    return status;
}

/* ------------------------------------------------------------------ the verdict */

/* Python's bytes.decode("utf-8", "replace"): each maximal invalid part becomes U+FFFD. */
static size_t utf8_replace(const unsigned char *in, size_t len, char *out)
{
    size_t at = 0;
    for (size_t i = 0; i < len;) {
        unsigned char c = in[i];
        if (c < 0x80) {
            out[at++] = (char)in[i++];
            continue;
        }
        size_t need = continuation_bytes(c), ok = 0;
        if (need) {
            unsigned char lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
            unsigned char hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
            while (ok < need && i + ok + 1 < len) {
                unsigned char next = in[i + ok + 1];
                if (ok == 0 ? next < lo || next > hi : (next & 0xc0) != 0x80)
                    break;
                ok++;
            }
        }
        if (need && ok == need) {
            memcpy(out + at, in + i, need + 1);
            at += need + 1;
            i += need + 1;
        } else {
            memcpy(out + at, "\xef\xbf\xbd", 3);
            at += 3;
            i += ok + 1;
        }
    }
    return at;
}

/* WireVerdict.decode, then the line on stderr and the code. */
__attribute__((noreturn))
static void obey(size_t len)
{
    static char line[MAX_VERDICT * 3 + 16];
    if (len < 4)
        finish(EX_UNAVAILABLE, "not sent: the mail gate answered in a way this sendmail does not understand "
               "(the verdict is too short); the administrator must restart it");
    int code = reply_buf[0], smtp_code = reply_buf[1] << 8 | reply_buf[2];
    const unsigned char *newline = memchr(reply_buf + 3, '\n', len - 3);
    if (!newline || smtp_code < 100 || smtp_code > 599)
        finish(EX_UNAVAILABLE, "not sent: the mail gate answered in a way this sendmail does not understand "
               "(the verdict is malformed); the administrator must restart it");
    size_t shown = (size_t)(newline - reply_buf) - 3;
    if (shown) {
        memcpy(line, PROGRAM ": ", sizeof PROGRAM + 1);
        size_t at = sizeof PROGRAM + 1;
        at += utf8_replace(reply_buf + 3, shown, line + at);
        line[at++] = '\n';
        say_bytes(line, at);
    }
    exit(code);
}

__attribute__((noreturn))
static void broken(enum status status, const struct target *target)
{
    if (status == CLOSED || status == RESET)
        finish(EX_UNAVAILABLE, "not sent: the mail gate closed the connection before answering; try again, "
               "and tell the administrator if it keeps happening");
    if (status == TIMED_OUT)
        finish(EX_UNAVAILABLE, "the mail gate did not answer within %g seconds; the message may or may not have "
               "been sent: check with the administrator before sending it again", target->timeout);
    if (status == BAD_FRAME)
        finish(EX_UNAVAILABLE, "not sent: the mail gate answered in a way this sendmail does not understand (%s); "
               "the administrator must restart it", bad_frame);
    finish(EX_UNAVAILABLE, "not sent: talking to the mail gate failed (%s); try again later",
           saved_errno == ETIMEDOUT ? "timed out" : strerror(saved_errno));
}

static void exchange(int fd, int argc, char **argv, const char *name, const struct target *target)
{
    int kind;
    size_t len;
    enum status status = read_frame(fd, now() + target->timeout, "GV", &kind, &len);
    if (status != OK)
        broken(status, target);
    if (kind == T_VERDICT)
        obey(len); /* refused before we said anything (busy, stopping) */
    if (len != strlen(GREETING_TEXT) || memcmp(reply_buf, GREETING_TEXT, len)) {
        char theirs[200], ours[64];
        bytes_repr(reply_buf, len < 40 ? len : 40, theirs, sizeof theirs);
        bytes_repr((const unsigned char *)GREETING_TEXT, strlen(GREETING_TEXT), ours, sizeof ours);
        finish(EX_UNAVAILABLE, "not sent: the mail gate speaks %s, this sendmail %s; the administrator must "
               "restart the gate", theirs, ours);
    }
    int answered = 0;
    status = send_request(fd, argc, argv, name, target, &answered);
    int closed = status == CLOSED || status == RESET; /* the gate may still have said why before it closed */
    if (status != OK && !closed)
        broken(status, target);
    /* The whole message is out: an orderly close now may follow a relayed message; a reset says
     * the gate left part of it unread, so it was not sent. */
    int whole = status == OK && !answered;
    status = read_frame(fd, closed ? now() : now() + target->timeout, "V", &kind, &len);
    if (whole && status == CLOSED)
        finish(EX_UNAVAILABLE, "%s", OUTCOME_UNKNOWN);
    if (status != OK)
        broken(closed && status == TIMED_OUT ? CLOSED : status, target);
    obey(len);
}

/* ------------------------------------------------------------------ main */

/* Descriptors 0-2 closed by the caller would be taken by the socket: give them /dev/null. */
static void open_standard_descriptors(void)
{
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
            continue;
        int null = open("/dev/null", O_RDWR | O_NOCTTY);
        if (null < 0)
            exit(EX_OSERR);
        if (null != fd) {
            /* Cannot happen (open takes the lowest free number), but never write into the wrong file. */
            exit(EX_OSERR);
        }
    }
}

int main(int argc, char **argv)
{
    struct target target;
    open_standard_descriptors();
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        exit(EX_OSERR);
    memset(&target, 0, sizeof target);
    if (argc < 1 || needs_front_end(argc, argv) || !read_target(&target))
        run_front_end(argv);
    struct stat info;
    if (stat(target.socket, &info) != 0)
        run_front_end(argv); /* no gate here: the front end says what is wrong (78 or 69) */
    const char *name = program_name(argc, argv);
    check_argv(argc, argv, name);
    int fd = connect_gate(&target);
    check_peer(fd, &target);
    exchange(fd, argc, argv, name, &target);
    return EX_SOFTWARE; /* not reached: exchange ends in exit */
}
