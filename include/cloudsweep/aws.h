/*
 * aws.h - everything CloudSweep needs to talk to AWS. The module is built in
 * sections, each below its own banner: request signing (AWS Signature
 * Version 4) comes first; request building, transport and XML parsing
 * follow it in later sections.
 *
 * The client section turns credentials and an action into a signed call,
 * hundreds at a time from one worker reactor: it owns an http_client, keeps
 * AWS's rate limits with token buckets, retries what AWS says to retry and
 * hands back either a small XML DOM (query protocol) or a json_t (KMS). The
 * STS section assumes roles and caches the temporary credentials per worker.
 *
 * Signing is pure computation on the caller's thread: it never blocks, never
 * calls back and keeps no pointer into the request after it returns. A
 * struct sigv4_signer owns the OpenSSL contexts it reuses for every request
 * and a small cache of derived signing keys, so it belongs to exactly one
 * thread (one per worker reactor). Secrets are borrowed, never copied into
 * long-lived memory: the cache is keyed by an HMAC of the secret under a
 * per-signer random key, and every derived key is wiped when its entry is
 * evicted or the signer freed. Nothing in this section logs a secret.
 */
#ifndef CLOUDSWEEP_AWS_H
#define CLOUDSWEEP_AWS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <event2/event.h>
#include <jansson.h>

#include "cloudsweep/util.h"

/* ==== Credentials ==== */

/*
 * One set of AWS credentials. Every pointer is borrowed: the signer reads
 * the values during a call and keeps none of them (the session token, when
 * present, is referenced by struct sigv4_result until it is cleared).
 */
struct aws_credentials {
	const char *access_key_id;     /* "AKIA..." or "ASIA..."; borrowed */
	const char *secret_access_key; /* borrowed; never copied, logged or cached in clear */
	const char *session_token;     /* STS session token, or NULL for long-term keys */
};

/* ==== Signature Version 4 ==== */

#define SIGV4_ALGORITHM        "AWS4-HMAC-SHA256"
#define SIGV4_UNSIGNED_PAYLOAD "UNSIGNED-PAYLOAD"
#define SIGV4_HASH_HEX_LEN     64   /* hex SHA-256 / HMAC-SHA256 */
#define SIGV4_AMZ_DATE_LEN     16   /* YYYYMMDDTHHMMSSZ */
#define SIGV4_CACHE_DEFAULT    64   /* signing keys kept when 0 is asked for */
#define SIGV4_CACHE_MAX        4096 /* most signing keys a signer keeps */
#define SIGV4_ADD_MAX          4    /* headers sigv4_sign asks the caller to add */

/* Input limits: anything larger is refused (-1) before any allocation. */
#define SIGV4_METHOD_MAX       16    /* bytes of method */
#define SIGV4_PATH_MAX         8192  /* bytes of path */
#define SIGV4_QUERY_MAX        16384 /* bytes of query string */
#define SIGV4_QUERY_PARAMS_MAX 256   /* query parameters */
#define SIGV4_HEADERS_MAX      64    /* caller headers */
#define SIGV4_HEADER_NAME_MAX  128   /* bytes of one header name */
#define SIGV4_HEADER_VALUE_MAX 8192  /* bytes of one header value */
#define SIGV4_SCOPE_PART_MAX   63    /* bytes of region or service */
#define SIGV4_KEY_ID_MAX       128   /* bytes of access key id */
#define SIGV4_SECRET_MAX       128   /* bytes of secret access key */
#define SIGV4_TOKEN_MAX        8192  /* bytes of session token */

/* Options for one request; 0 is right for every query and JSON protocol service. */
enum sigv4_flags {
	SIGV4_NO_NORMALIZE_PATH = 1 << 0, /* keep ".", ".." and empty path segments as they are */
	SIGV4_NO_DOUBLE_ENCODE = 1 << 1,  /* the path is used as given, not URI-encoded again */
	SIGV4_CONTENT_SHA256 = 1 << 2,    /* add and sign X-Amz-Content-Sha256 */
	SIGV4_TOKEN_UNSIGNED = 1 << 3,    /* add X-Amz-Security-Token but leave it unsigned */
};

/* What S3 expects: the path verbatim and the payload hash as a header. */
#define SIGV4_S3 (SIGV4_NO_NORMALIZE_PATH | SIGV4_NO_DOUBLE_ENCODE | SIGV4_CONTENT_SHA256)

/* One header: a name/value pair, both borrowed. */
struct sigv4_header {
	const char *name;  /* a token; matched case-insensitively */
	const char *value; /* no CR, LF or NUL; surrounding and repeated blanks do not matter */
};

/*
 * The request to sign. Every pointer is borrowed for the duration of the
 * call. path and query are exactly what goes on the request line (path
 * from its leading '/', query without '?'); the signer canonicalizes them
 * (query parameters are percent-decoded and re-encoded per RFC 3986, so a
 * wire query may use either form). headers are all the headers to sign and
 * must include Host; repeated names are signed as one comma-joined value in
 * their order here. The signer itself adds X-Amz-Date, X-Amz-Security-Token
 * (when the credentials carry one) and, with SIGV4_CONTENT_SHA256,
 * X-Amz-Content-Sha256, and refuses those names (and Authorization) in
 * headers.
 */
struct sigv4_request {
	const char *method;                 /* "GET", "POST", ... */
	const char *path;                   /* "/" for query and JSON protocol APIs */
	const char *query;                  /* "Action=...&Version=...", or NULL / "" */
	const struct sigv4_header *headers; /* nheaders entries */
	size_t nheaders;
	const void *payload;      /* body, or NULL when payload_len is 0 */
	size_t payload_len;       /* body length; any size (it is only hashed) */
	const char *payload_hash; /* precomputed hex SHA-256 or SIGV4_UNSIGNED_PAYLOAD; NULL: hash
	                             payload */
	const char *region;       /* "us-east-1" */
	const char *service;      /* "ec2", "sts", ... (the signing name) */
	time_t now;               /* signing time (UTC seconds); tests inject a fixed one */
	unsigned flags;           /* enum sigv4_flags */
};

/*
 * What signing produced. headers[0..nheaders) are the headers to add to the
 * request, in this order; their values point into this struct (and, for
 * X-Amz-Security-Token, into the credentials), so the struct must not be
 * copied and the credentials must outlive its use. Release it with
 * sigv4_result_clear().
 */
struct sigv4_result {
	char amz_date[SIGV4_AMZ_DATE_LEN + 1];      /* X-Amz-Date value */
	char payload_hash[SIGV4_HASH_HEX_LEN + 1];  /* payload hash that was signed */
	char signature[SIGV4_HASH_HEX_LEN + 1];     /* hex signature */
	char *authorization;                        /* owned: Authorization value */
	struct sigv4_header headers[SIGV4_ADD_MAX]; /* headers to add; borrowed values */
	size_t nheaders;
};

/* Counters of the signing-key cache, for tests and metrics. */
struct sigv4_stats {
	uint64_t hits;      /* signing keys found in the cache */
	uint64_t misses;    /* signing keys derived */
	uint64_t evictions; /* entries dropped to make room */
	size_t entries;     /* entries in use */
	size_t capacity;    /* entries the cache holds */
};

struct sigv4_signer;

/*
 * A signer with room for cache_entries signing keys (0: SIGV4_CACHE_DEFAULT,
 * at most SIGV4_CACHE_MAX). One per thread. NULL when OpenSSL cannot
 * provide HMAC-SHA256 (logged).
 */
struct sigv4_signer *sigv4_signer_new(size_t cache_entries);
/* Wipe every cached key and release the signer; NULL is fine. */
void sigv4_signer_free(struct sigv4_signer *s);
/* Copy the cache counters into st. */
void sigv4_signer_stats(const struct sigv4_signer *s, struct sigv4_stats *st);

/*
 * Sign req with cred. On success fills out (which the caller then clears
 * with sigv4_result_clear) and returns 0. Returns -1, with out cleared,
 * when an input is malformed or over a limit above, or on an OpenSSL
 * failure (logged, without any secret).
 */
int sigv4_sign(struct sigv4_signer *s, const struct aws_credentials *cred,
               const struct sigv4_request *req, struct sigv4_result *out) CS_WUR;
/* Free what out owns and zero it; safe on a zeroed or already cleared result. */
void sigv4_result_clear(struct sigv4_result *out);

/*
 * The canonical request (*creqp) and the string to sign (*stsp) sigv4_sign
 * would use, as malloc'd strings the caller frees; either pointer may be
 * NULL when not wanted. For tests and debugging: neither holds a secret.
 * Returns 0, or -1 as sigv4_sign does (outputs set to NULL).
 */
int sigv4_canonical(struct sigv4_signer *s, const struct aws_credentials *cred,
                    const struct sigv4_request *req, char **creqp, char **stsp) CS_WUR;

/*
 * URI-encode len bytes of in per the SigV4 rules (RFC 3986 unreserved
 * characters stay, everything else becomes %XX in upper case; '/' stays too
 * when keep_slash) into a malloc'd string; NULL when len is over
 * SIGV4_QUERY_MAX. Callers use it to build query strings and S3 keys that
 * sign the same way they travel.
 */
char *sigv4_uri_encode(const char *in, size_t len, bool keep_slash);

/* ==== XML responses ==== */

/*
 * Query-protocol responses are parsed with expat into a small read-only
 * DOM. Namespaces are dropped (AWS uses one per service and version); a
 * DOCTYPE, an entity declaration, more than AWS_XML_MAX_DEPTH levels or
 * AWS_XML_MAX_NODES elements make the document invalid, so a hostile or
 * broken endpoint cannot make the parser expand or recurse without bound.
 */
#define AWS_XML_MAX_DEPTH 64
#define AWS_XML_MAX_NODES 262144

/* One element. Everything belongs to its document and lives as long as it. */
struct aws_xml_node {
	const char *name;                  /* local name, namespace prefix removed */
	const char *text;                  /* character data directly inside, "" if none;
	                                      whitespace-trimmed when the element has children */
	size_t text_len;                   /* bytes of text */
	const struct aws_xml_node *parent; /* NULL for the root */
	const struct aws_xml_node *child;  /* first child, or NULL */
	const struct aws_xml_node *next;   /* next sibling, or NULL */
};

struct aws_xml_doc;

/*
 * Parse len bytes of XML. NULL when the input is not well-formed or over a
 * limit; err (errlen bytes) then says why and where, without quoting input.
 */
struct aws_xml_doc *aws_xml_parse(const char *buf, size_t len, char *err, size_t errlen);
/* Free a document and every node in it; NULL is fine. */
void aws_xml_free(struct aws_xml_doc *doc);
/* The same, wiping the text first: for answers that carry secrets (STS credentials). */
void aws_xml_free_secret(struct aws_xml_doc *doc);
/* The document element. */
const struct aws_xml_node *aws_xml_root(const struct aws_xml_doc *doc);
/* The first child of n named name, or NULL (n may be NULL). */
const struct aws_xml_node *aws_xml_child(const struct aws_xml_node *n, const char *name);
/*
 * Follow a '/'-separated path of child names from n ("Credentials/AccessKeyId");
 * "*" matches any one name. NULL when some step is missing.
 */
const struct aws_xml_node *aws_xml_find(const struct aws_xml_node *n, const char *path);
/* The text of aws_xml_find(n, path), or NULL when it is missing. */
const char *aws_xml_text(const struct aws_xml_node *n, const char *path);
/* The next sibling of n with the same name, for walking <item>/<member> lists. */
const struct aws_xml_node *aws_xml_next(const struct aws_xml_node *n);

/* Walk the <item> or <member> (any name) children of list: AWS's list shapes. */
#define AWS_XML_FOREACH(it, list, name)                                                 \
	for (const struct aws_xml_node *it = aws_xml_child((list), (name)); it != NULL; \
	     it = aws_xml_next(it))

/* ==== The client ==== */

/* The services CloudSweep calls; each knows its protocol, version and endpoint. */
enum aws_service {
	AWS_EC2,        /* query protocol, XML; SDK id "EC2" */
	AWS_STS,        /* query; "STS" */
	AWS_RDS,        /* query; "RDS" */
	AWS_ELB,        /* classic load balancing, query; "ELASTIC_LOAD_BALANCING" */
	AWS_ELBV2,      /* query; "ELASTIC_LOAD_BALANCING_V2" */
	AWS_CLOUDWATCH, /* query; "CLOUDWATCH" */
	AWS_KMS,        /* JSON protocol (X-Amz-Target TrentService.*); "KMS" */
	AWS_SERVICE_COUNT
};

/*
 * Defaults of the rate limits. AWS meters EC2 per account and region with
 * token buckets (published: non-mutating actions a bucket of 100 refilled at
 * 20/s, mutating ones 200 at 5/s, "Request throttling for the Amazon EC2
 * API"); CloudSweep's defaults allow describe calls 100/s with a burst of
 * 100 and mutating calls 50/s with a burst of 50 per (account, service,
 * region), and lean on AWS's own throttling answers (retried with backoff)
 * for the rest.
 */
#define AWS_DEFAULT_MAX_IN_FLIGHT         256
#define AWS_DEFAULT_MAX_IN_FLIGHT_ACCOUNT 64
#define AWS_DEFAULT_READ_RATE             100
#define AWS_DEFAULT_READ_BURST            100
#define AWS_DEFAULT_WRITE_RATE            50
#define AWS_DEFAULT_WRITE_BURST           50
#define AWS_DEFAULT_ATTEMPTS              5
#define AWS_DEFAULT_DEADLINE_MS           30000
#define AWS_DEFAULT_ATTEMPT_TIMEOUT_MS    10000
#define AWS_DEFAULT_BACKOFF_BASE_MS       100
#define AWS_DEFAULT_BACKOFF_MAX_MS        20000
#define AWS_DEFAULT_MAX_RESPONSE          (16u << 20)
#define AWS_DEFAULT_STS_REFRESH_S         300
#define AWS_PARAMS_MAX                    4096 /* query parameters of one call */

/*
 * Client settings; a zero field takes the default above. Endpoints: a
 * per-service override here wins over endpoint_url here, which wins over the
 * environment's AWS_ENDPOINT_URL_<SDK ID> and then AWS_ENDPOINT_URL; without
 * any, the real regional endpoint (https://SERVICE.REGION.amazonaws.com) is
 * used. http:// is accepted for local emulators. ca_file (else
 * AWS_CA_BUNDLE, else the system store) verifies the endpoints' certificates.
 */
struct aws_client_options {
	int max_in_flight;              /* HTTP requests outstanding at once, all accounts */
	int max_in_flight_per_account;  /* so one large customer cannot starve the rest */
	double read_rate, read_burst;   /* tokens/s and bucket size for non-mutating calls */
	double write_rate, write_burst; /* the same for mutating calls */
	int attempts;                   /* tries per call, first one included */
	int deadline_ms;                /* per call, from aws_call() to its callback */
	int attempt_timeout_ms;         /* per try, so a hung connection is retried */
	int backoff_base_ms;            /* full jitter: sleep U(0, min(max, base * 2^try)) */
	int backoff_max_ms;
	size_t max_response_bytes; /* largest response body accepted */
	int sts_refresh_before_s;  /* cached role credentials are renewed this long before expiry */
	const char *ca_file;       /* borrowed during aws_client_new */
	const char *endpoint_url;  /* borrowed during aws_client_new; NULL or "": none */
	const char *endpoint_urls[AWS_SERVICE_COUNT]; /* borrowed; per service, NULL: none */
	bool no_env; /* ignore AWS_ENDPOINT_URL* and AWS_CA_BUNDLE (tests) */
};

/* One query parameter; both borrowed until aws_call() returns. */
struct aws_param {
	const char *name;  /* "VolumeId.1", "Filter.1.Name", ... */
	const char *value; /* raw; the client URL-encodes it */
};

/*
 * One call. Everything is copied by aws_call(), credentials included (the
 * copy is wiped when the call ends), so the caller may free it at once.
 */
struct aws_request {
	enum aws_service service;
	const char *region;                  /* "us-east-1" */
	const struct aws_credentials *creds; /* signs every attempt */
	const char *account; /* rate-limit key (the AWS account id); NULL: the access key id */
	const char *action;  /* "DescribeVolumes"; for KMS "Decrypt" (TrentService.Decrypt) */
	const char *version; /* NULL: the service's API version */
	const struct aws_param *params; /* query protocol */
	size_t nparams;
	const char *json_body; /* JSON protocol: the request document; NULL: "{}" */
	bool mutating;         /* counts against the write bucket and is never re-sent by the
	                          HTTP layer on its own; this client still retries it on
	                          throttling, 5xx, timeouts and resets as AWS's SDKs do, so
	                          pass the API's ClientToken where it has one */
	int deadline_ms;       /* 0: the client's default */
};

enum aws_status {
	AWS_OK = 0,        /* 2xx and the body parsed */
	AWS_ERR_SERVICE,   /* AWS answered with an error: error_code/error_message */
	AWS_ERR_THROTTLED, /* still throttled (or 5xx) when the attempts ran out */
	AWS_ERR_TIMEOUT,   /* the call's deadline passed */
	AWS_ERR_NETWORK,   /* DNS, connect, TLS or reset, on every attempt */
	AWS_ERR_RESPONSE,  /* the response was malformed or over the size limit */
	AWS_ERR_REQUEST,   /* the request could not be built or signed (nothing was sent) */
};

/*
 * What a call produced, handed to its callback. Every pointer is valid only
 * during the callback.
 */
struct aws_result {
	enum aws_status status;
	int http_status;                /* of the last response, 0 when none arrived */
	const char *error_code;         /* AWS's code ("AccessDenied") or ""; never a secret */
	const char *message;            /* AWS's message, or what happened
	                                   ("Throttling after 5 attempts: Rate exceeded"); "" on success */
	const char *request_id;         /* x-amzn-RequestId or <RequestId>, "" when absent */
	int attempts;                   /* requests sent */
	const struct aws_xml_node *xml; /* query protocol: the response's root (also for errors) */
	json_t *json; /* JSON protocol: the response document (borrowed), or NULL */
};

struct aws_client;
struct aws_call;

/* Called exactly once per call from the event loop, unless the call was cancelled. */
typedef void (*aws_call_cb)(const struct aws_result *res, void *arg);

/* Counters for metrics and tests. */
struct aws_client_stats {
	uint64_t calls;          /* aws_call() accepted */
	uint64_t attempts;       /* HTTP requests sent */
	uint64_t retries;        /* attempts after the first */
	uint64_t throttled;      /* answers that were throttling */
	uint64_t failed;         /* calls that ended with an error */
	uint64_t in_flight;      /* gauge: HTTP requests outstanding */
	uint64_t max_in_flight;  /* the most outstanding at once */
	uint64_t waiting;        /* gauge: calls waiting for a token or a slot */
	uint64_t sts_calls;      /* AssumeRole requests sent */
	uint64_t sts_cache_hits; /* role credentials served from the cache */
};

/* A client on base (borrowed). opt may be NULL. NULL on error (logged). */
struct aws_client *aws_client_new(struct event_base *base, const struct aws_client_options *opt);
/* Cancel every pending call (no callback runs), wipe cached credentials, free. */
void aws_client_free(struct aws_client *client);
/*
 * Start a call. Returns its handle, valid until the callback returns or
 * aws_call_cancel(); NULL when the request is invalid (logged without
 * parameters) - then cb never runs.
 */
struct aws_call *aws_call(struct aws_client *client, const struct aws_request *req, aws_call_cb cb,
                          void *arg);
/* Cancel a call: its callback never runs. A no-op from inside its own callback. */
void aws_call_cancel(struct aws_call *call);
/* Copy the counters. */
void aws_client_stats(const struct aws_client *client, struct aws_client_stats *out);
/* The endpoint URL a service and region resolve to (for logs and tests; "" if invalid). */
const char *aws_client_endpoint(struct aws_client *client, enum aws_service service,
                                const char *region, char *buf, size_t len);
/* "ok", "service", "throttled", "timeout", "network", "response", "request". */
const char *aws_status_name(enum aws_status st);

/* ==== Pagination ==== */

struct aws_pager;

/*
 * One page of a paginated call. last is true on the final page and on an
 * error (res->status != AWS_OK); return false to stop early (no further
 * callback runs).
 */
typedef bool (*aws_page_cb)(const struct aws_result *res, bool last, void *arg);

/*
 * Run req page after page: each response's next token (the element named
 * token_param or "Next" + token_param, case-insensitively, under the root or
 * its *Result element; the same key in a JSON body) is sent back as
 * token_param ("NextToken", "Marker") until a page has none. The request is
 * copied. NULL when invalid (cb never runs).
 */
struct aws_pager *aws_paginate(struct aws_client *client, const struct aws_request *req,
                               const char *token_param, aws_page_cb cb, void *arg);
/* Stop a pager: no further callback runs. A no-op from inside its callback. */
void aws_pager_cancel(struct aws_pager *p);

/* ==== STS and credentials ==== */

/* Credentials with owned strings, wiped by aws_owned_credentials_clear. */
struct aws_owned_credentials {
	char *access_key_id;     /* owned */
	char *secret_access_key; /* owned secret */
	char *session_token;     /* owned secret, or NULL */
	time_t expiration;       /* UTC seconds, 0 for long-term keys */
};

/* Wipe and free the strings; safe on a zeroed struct. */
void aws_owned_credentials_clear(struct aws_owned_credentials *c);
/* A borrowed view for signing. */
struct aws_credentials aws_owned_credentials_view(const struct aws_owned_credentials *c);

/*
 * CloudSweep's own (base) credentials, which assume customers' roles: from
 * path when it is non-empty - an AWS shared-credentials style file of
 * "key = value" lines with aws_access_key_id, aws_secret_access_key and
 * optionally aws_session_token ('#'/';' comments and [section] lines are
 * ignored; the file should be mode 0600) - otherwise from the environment
 * (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). 0, or -1
 * when none are found (logged, without values).
 */
int aws_base_credentials_load(const char *path, struct aws_owned_credentials *out) CS_WUR;

/* What to assume. Strings are copied. */
struct aws_assume_role {
	const char *role_arn;        /* arn:aws:iam::123456789012:role/Name */
	const char *external_id;     /* the customer's external id, or NULL */
	int duration_s;              /* 900..43200; 0: 3600 */
	const char *session_name;    /* RoleSessionName: the purpose ("scan", "verify") */
	const char *source_identity; /* SourceIdentity: the organization, or NULL */
	bool no_cache;               /* always call STS and cache nothing (onboarding probes) */
};

struct aws_sts_wait;

/*
 * The outcome of an assume: on AWS_OK creds (valid only during the callback;
 * copy what must outlive it, or just pass them to aws_call, which copies).
 */
typedef void (*aws_sts_cb)(const struct aws_result *res, const struct aws_credentials *creds,
                           time_t expiration, void *arg);

/*
 * Temporary credentials for a role: from the per-client cache, keyed by
 * (source identity, role ARN, external id, base access key) but not by the
 * session name, while they have more than sts_refresh_before_s left;
 * otherwise from one AssumeRole that concurrent askers share. Cached
 * credentials live only in this process's memory and are wiped when dropped.
 * cb always runs from the event loop. NULL when the request is invalid.
 */
struct aws_sts_wait *aws_sts_assume_role(struct aws_client *client,
                                         const struct aws_credentials *base, const char *region,
                                         const struct aws_assume_role *role, aws_sts_cb cb,
                                         void *arg);
/* Stop waiting: cb never runs (a shared AssumeRole still fills the cache). */
void aws_sts_wait_cancel(struct aws_sts_wait *w);
/*
 * A call signed with creds got res: when AWS rejected those credentials
 * (InvalidClientTokenId, ExpiredToken, AuthFailure, UnrecognizedClientException,
 * ExpiredTokenException), drop and wipe the cached entry that holds them, so
 * the next assume of that role fetches fresh ones. Anything else is a no-op.
 * The client calls it on every AWS error answer.
 */
void aws_sts_credentials_rejected(struct aws_client *cl, const struct aws_credentials *creds,
                                  const struct aws_result *res);

/* The module's own plumbing between client.c and sts.c; not for other callers. */
struct aws_sts_cache;
struct aws_sts_cache **aws_client_sts_slot(struct aws_client *client);
int aws_client_sts_refresh_before(const struct aws_client *client);
struct event_base *aws_client_base(struct aws_client *client);
void aws_sts_cache_free(struct aws_sts_cache *cache);
void aws_sts_cache_counts(const struct aws_sts_cache *cache, uint64_t *calls, uint64_t *hits);

/* ==== The worker's client ==== */

struct config;

/* Build this worker's client from the aws_* options; -1 on error (logged). */
int aws_worker_init(struct event_base *base, const struct config *cfg) CS_WUR;
/* Free this worker's client (pending calls are cancelled). */
void aws_worker_free(void);
/* This worker's client, or NULL before aws_worker_init. */
struct aws_client *aws_worker_client(void);
/* This worker's base credentials (aws_credentials_file or the environment), or NULL. */
const struct aws_credentials *aws_worker_base_credentials(void);

#endif
