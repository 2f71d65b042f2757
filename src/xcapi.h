/*-------------------------------------------------------------------------
 *
 * xcapi.h
 *		Shared types, settings and cross-file prototypes of xcapi.
 *
 * Glossary used throughout:
 *	conversion	one row of xcapi_conversions: one event for X
 *	batch		up to xcapi.batch_size conversions of one pixel, one request
 *	attempt		one HTTP request carrying a batch; each is signed afresh
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/xcapi.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef XCAPI_H
#define XCAPI_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "storage/block.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/array.h"
#include "utils/jsonb.h"

#ifndef XCAPI_VERSION
#define XCAPI_VERSION "unknown"
#endif

/* X accepts at most this many conversions in one request. */
#define XCAPI_MAX_BATCH 500

/* Settings (xcapi.c) */
extern char *xcapi_database;
extern char *xcapi_api_url;
extern char *xcapi_api_version;
extern int	xcapi_batch_size;
extern char *xcapi_ca_file;
extern char *xcapi_credentials_file;
extern int	xcapi_max_inflight;
extern int	xcapi_connect_timeout;
extern int	xcapi_request_timeout;
extern int	xcapi_max_attempts;
extern int	xcapi_retry_base;
extern int	xcapi_retry_max;
extern int	xcapi_naptime;
extern int	xcapi_batch_delay;
extern int	xcapi_rate_limit_events;
extern int	xcapi_rate_limit_requests;
extern int	xcapi_rate_window;
extern int	xcapi_retention;

/* Why the worker holds a pixel's conversions back (or XCAPI_PAUSE_NONE). */
#define XCAPI_PAUSE_NONE (-1)
#define XCAPI_PAUSE_NO_CREDENTIALS 0
#define XCAPI_PAUSE_PACING 1
#define XCAPI_PAUSE_UNSAFE_URL 2
/* 401, 403 and 429 stand for themselves */

/* How many pixels the worker publishes its state for. */
#define XCAPI_MAX_SHARED_PIXELS 64

typedef struct XcapiPixelShared
{
	char		pixel[65];
	char		account[65];	/* "" until X names it */
	TimestampTz paused_until;
	int			pause_kind;
	TimestampTz last_success;
	int			last_http_status;
} XcapiPixelShared;

/*
 * What backends and the worker share.  The latch pointer lets a committing
 * backend wake the worker; the rest is what the worker publishes for
 * monitoring (xcapi_worker_state, xcapi_pixel_state).
 */
typedef struct XcapiShared
{
	slock_t		mutex;
	pid_t		worker_pid;
	Latch	   *worker_latch;
	TimestampTz worker_started;
	uint64		requests;
	uint64		conversions_sent;
	uint64		retries;
	int			last_http_status;
	int			npixels;
	XcapiPixelShared pixels[XCAPI_MAX_SHARED_PIXELS];
	/* hashes of the pixels paused now: commits for them need not wake */
	int			npaused;
	uint32		paused_hash[XCAPI_MAX_SHARED_PIXELS];

	/*
	 * Lowest intake block a transaction that committed since the worker
	 * last looked wrote to (InvalidBlockNumber: none); see
	 * xcapi_outbox_file_intake.
	 */
	pg_atomic_uint32 intake_low_block;
} XcapiShared;

extern XcapiShared *xcapi_shared;
extern bool xcapi_preloaded;

/* xcapi.c */
extern void xcapi_wake_worker(void);
extern void xcapi_wake_worker_at_commit(void);
extern void xcapi_note_fired(const char *pixel);
extern uint32 xcapi_pixel_hash(const char *pixel);
extern bool xcapi_fired_in_this_transaction(void);

/* identifiers.c */
#define XCAPI_MAX_PIXEL_LEN 64
extern bool xcapi_is_base36(const char *s, size_t len);
extern bool xcapi_is_pixel_id(const char *s, size_t len);
extern void xcapi_sha256_hex(const char *data, size_t len, char *out /* 65 */ );
extern bool xcapi_is_sha256_hex(const char *s, size_t len);
extern char *xcapi_email_hash(const char *raw, const char *argname);
extern char *xcapi_phone_normalize(const char *raw, const char *argname);
extern char *xcapi_phone_hash(const char *raw, const char *argname);

/* sign.c */
typedef struct XcapiParam
{
	const char *name;
	const char *value;
} XcapiParam;

extern void xcapi_percent_encode_into(StringInfo dst, const char *src, size_t len);
extern char *xcapi_base_string(const char *method, const char *url,
							   XcapiParam *params, int nparams);
extern char *xcapi_hmac_sha1_base64(const char *consumer_secret,
									const char *token_secret,
									const char *base_string);
extern void xcapi_random_nonce(char *out /* 33 */ );
extern char *xcapi_oauth_authorization(const char *method, const char *url,
									   const char *consumer_key,
									   const char *consumer_secret,
									   const char *token,
									   const char *token_secret,
									   const char *nonce, int64 timestamp);

/* payload.c */
typedef struct XcapiConversion
{
	const char *event_id;
	const char *conversion_id;
	TimestampTz conversion_time;
	const char *twclid;
	const char *hashed_email;
	const char *hashed_phone;
	const char *ip_address;
	const char *user_agent;
	const char *value;			/* numeric's text form, or NULL */
	const char *currency;
	int32		number_items;	/* 0: not given */
	const char *description;
	Jsonb	   *contents;
} XcapiConversion;

extern char *xcapi_conversion_json(const XcapiConversion *conv);
extern void xcapi_json_decimal(StringInfo dst, const char *numeric_text);
extern void xcapi_batch_body(StringInfo body, char **payloads, int n);
extern char *xcapi_error_messages(const char *response, size_t len);
extern char *xcapi_response_account_id(const char *response, size_t len);

/* credentials.c */
typedef struct XcapiCredentials
{
	char	   *consumer_key;
	char	   *consumer_secret;
	char	   *access_token;
	char	   *access_token_secret;
	char	   *pixel_token;
} XcapiCredentials;

extern bool xcapi_credentials_load(void);
extern bool xcapi_credentials_for(const char *pixel, XcapiCredentials *out);

/* http.c */
typedef struct XcapiHttpRequest
{
	/* filled by the caller */
	char	   *url;
	char	   *body;
	size_t		body_len;
	char	   *auth_header;	/* complete header line, secret inside */
	/* filled by xcapi_http_perform */
	long		http_status;	/* 0 if no HTTP answer was received */
	char		transport_error[256];	/* set when http_status is 0 */
	StringInfoData response;
	int64		rate_limit_reset;	/* epoch seconds, 0 if absent */
	int64		rate_limit_remaining;	/* -1 if absent */
	int64		retry_after;	/* seconds, -1 if absent */
	bool		resend_refused; /* kept-alive connection died before any
								 * answer; libcurl did not replay it */
	/* private */
	size_t		body_sent;
	void	   *handle;
	void	   *headers;
} XcapiHttpRequest;

extern void xcapi_http_init(void);
extern void xcapi_http_reset_connections(void);
extern void xcapi_http_perform(XcapiHttpRequest **requests, int n);
extern bool xcapi_http_url_is_safe(const char *url);

/* outbox.c */
typedef struct XcapiClaimed
{
	int64		id;
	char	   *pixel_id;
	char	   *payload;
	int			attempts;
} XcapiClaimed;

/* A new outbox row: what the caller gives; the rest are column defaults. */
typedef struct XcapiQueuedRow
{
	int64		id;
	const char *pixel;
	const char *event_id;
	const char *conversion_id;
	TimestampTz conversion_time;
	const char *payload;		/* the conversion object's JSON, as sent */
} XcapiQueuedRow;

extern bool xcapi_outbox_lookup_schema(void);
extern const char *xcapi_outbox_schema(void);
extern const char *xcapi_outbox_schema_raw(void);
extern int64 xcapi_outbox_next_id(void);
extern void xcapi_outbox_init(void);
extern void xcapi_outbox_insert(const XcapiQueuedRow *row, bool batchable);
extern int	xcapi_outbox_repair(void);
extern int	xcapi_outbox_claim(int limit, ArrayType *paused_pixels,
							   XcapiClaimed **rows);
extern TimestampTz xcapi_outbox_next_due(ArrayType *paused_pixels,
										  TimestampTz before);
extern void xcapi_outbox_mark_sent(int64 *ids, int n, int http_status);
extern void xcapi_outbox_mark_retry(int64 *ids, int n, int http_status,
									const char *error, TimestampTz next_attempt,
									bool count_attempt);
extern void xcapi_outbox_mark_dead(int64 *ids, int n, int http_status,
								   const char *error);
extern void xcapi_outbox_release_auth_pauses(ArrayType *pixels);
extern int	xcapi_outbox_purge(int retention_secs, int limit);
extern bool xcapi_outbox_file_intake(int limit);
extern void xcapi_outbox_defer(ArrayType *pixels, ArrayType *untils,
							   ArrayType *reasons);

/* pacing.c */
extern int	xcapi_pacing_allow(const char *pixel, int want, TimestampTz now,
							   TimestampTz *resume_at);
extern void xcapi_pacing_record(const char *pixel, int n, TimestampTz now);
extern void xcapi_pacing_learn_account(const char *pixel, const char *account);
extern const char *xcapi_pacing_account(const char *pixel);

/* monitor.c */
extern const char *xcapi_pause_reason(int kind);

/* worker.c */
extern PGDLLEXPORT void xcapi_worker_main(Datum main_arg);

#endif							/* XCAPI_H */
