/*
 * net.h - the HTTPS server side of a worker: the TLS context, the listener
 * and the client connection state machine
 *   accept -> TLS handshake -> read and parse -> dispatch -> write ->
 *   keep-alive (back to read) or close,
 * with a limit and a timeout in every state. Each connection has one state
 * enum, one transition function (conn_set_state) and one teardown
 * (conn_close), which cancels the request in progress and frees the
 * connection after the callback stack unwinds.
 */
#ifndef CLOUDSWEEP_NET_H
#define CLOUDSWEEP_NET_H

#include <event2/event.h>
#include <openssl/ssl.h>
#include <stdbool.h>

#include "cloudsweep/config.h"
#include "cloudsweep/http.h"
#include "cloudsweep/util.h"

struct server;

/* Build the listener TLS context: TLS 1.3 only, ALPN http/1.1, tickets. NULL on error (logged). */
SSL_CTX *net_tls_server_ctx(const char *cert_file, const char *key_file);

/* Open a listening TCP socket with SO_REUSEPORT on addr:port; -1 on error (logged). */
int net_listen(const char *addr, int port);

/*
 * Serve HTTPS on listen_fd (already listening) with requests going to
 * router. cfg is borrowed and may be replaced with server_set_config().
 */
struct server *server_new(struct event_base *base, int listen_fd, SSL_CTX *ctx,
                          const struct config *cfg, struct router *router);
/* Point at a new configuration (after SIGHUP); limits apply to new requests. */
void server_set_config(struct server *s, const struct config *cfg);
/* Stop accepting, close idle connections, finish in-flight ones; done_cb runs when none is left. */
void server_drain(struct server *s, void (*done_cb)(void *), void *arg);
/* Close everything and free the server. */
void server_free(struct server *s);
/* Open client connections. */
int server_connections(const struct server *s);

/* Hand a finished response (whole wire bytes) to the connection (http layer only). */
void conn_send_response(struct conn *c, struct http_request *req, const char *data, size_t len,
                        int status);
/* True when the server is draining, so responses should carry Connection: close. */
bool conn_draining(const struct conn *c);

#endif
