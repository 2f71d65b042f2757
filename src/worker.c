/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The background worker: claim, sign, send, record, and pace.
 *
 * Each iteration claims up to batch_size * max_inflight due conversions in
 * one short transaction, groups them into per-pixel batches, sends up to
 * max_inflight requests at once outside any transaction, and records every
 * outcome in a second short transaction.  Then it loops at once, or, with
 * nothing due, sleeps on its latch until a commit wakes it, the next retry
 * is due, or xcapi.naptime passes.
 *
 * What an answer means (x-conversions-api.md section 4):
 *	2xx			sent
 *	400, 413	the whole request was refused for some conversion in it, X does
 *				not say which: split the batch in halves and send each, down
 *				to the single conversion, which is then dead with X's message
 *	404			dead: the pixel, event or account is wrong for every row
 *	401, 403	the credential is refused: hold the pixel's rows (attempt not
 *				counted), log once, try again slowly or right after a reload
 *	429			hold the pixel until X's reset time (attempt not counted)
 *	other		(5xx, timeouts, resets, DNS, TLS) retry with exponential
 *				backoff and full jitter until xcapi.max_attempts, then dead
 *
 * Errors are not caught: the worker exits, is restarted after a second, and
 * its start-up repair re-queues what it had in flight.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

/* How long a refused or missing credential holds a pixel's rows. */
#define AUTH_PAUSE_SECS 300

/* Used when a 429 names no reset time. */
#define RATE_LIMIT_DEFAULT_SECS 60

typedef enum Outcome
{
	OUT_SENT,
	OUT_RETRY,
	OUT_DEAD
} Outcome;

/* A run of claimed rows (one pixel, contiguous after sorting). */
typedef struct Batch
{
	int			start;
	int			n;
} Batch;

/* What to record for a run of rows. */
typedef struct BatchResult
{
	int			start;
	int			n;
	Outcome		outcome;
	int			http_status;
	char	   *error;
	TimestampTz next_attempt;
	bool		count_attempt;
} BatchResult;

/* Per-pixel state kept across iterations. */
typedef struct PixelState
{
	char		pixel[65];		/* hash key */
	TimestampTz paused_until;
	int			pause_status;	/* XCAPI_PAUSE_* or 401, 403, 429 */
	bool		warned;
	TimestampTz last_success;
	int			last_http_status;
} PixelState;

/* Purge sent rows past xcapi.retention at most this often (see maybe_purge). */
#define PURGE_INTERVAL_SECS 60
#define PURGE_BATCH 10000

/* Most intake rows filed into the outbox per iteration. */
#define FILE_CHUNK 10000

static MemoryContext loop_context = NULL;
static MemoryContext round_context = NULL;
static HTAB *pixel_states = NULL;
static bool repaired = false;
static TimestampTz next_purge = 0;
static bool purge_pending = true;
static List *released_pixels = NIL;	/* auth pauses lifted by a reload */
static bool credentials_changed = false;
static bool api_url_safe = false;	/* xcapi_http_url_is_safe(xcapi.api_url) */
static TimestampTz last_claim = 0;
static bool last_claim_full = false;
static bool last_claim_blocked = false;
static bool pauses_changed = false;	/* a pixel was paused since the last claim */
static bool intake_backlog = false;	/* the last filing left rows behind */
static TimestampTz last_defer = 0;

#define DEFER_INTERVAL_MS 100	/* empty while pixels were paused */

/* Least time between claims that find nothing while some pixel is paused. */
#define BLOCKED_CLAIM_INTERVAL_MS 20
static bool extension_missing_logged = false;
static bool filing_failure_logged = false;

static void
worker_shmem_exit(int code, Datum arg)
{
	SpinLockAcquire(&xcapi_shared->mutex);
	xcapi_shared->worker_pid = 0;
	xcapi_shared->worker_latch = NULL;
	SpinLockRelease(&xcapi_shared->mutex);
}

static void
advertise_worker(void)
{
	SpinLockAcquire(&xcapi_shared->mutex);
	xcapi_shared->worker_pid = MyProcPid;
	xcapi_shared->worker_latch = MyLatch;
	xcapi_shared->worker_started = GetCurrentTimestamp();
	SpinLockRelease(&xcapi_shared->mutex);
	on_shmem_exit(worker_shmem_exit, (Datum) 0);
}

static PixelState *
pixel_state(const char *pixel, bool create)
{
	char		key[65] = {0};
	PixelState *st;
	bool		found;

	strlcpy(key, pixel, sizeof(key));
	st = hash_search(pixel_states, key, create ? HASH_ENTER : HASH_FIND,
					 &found);
	if (st && !found)
	{
		st->paused_until = 0;
		st->pause_status = XCAPI_PAUSE_NONE;
		st->warned = false;
		st->last_success = 0;
		st->last_http_status = 0;
	}
	return st;
}

static bool
pixel_paused(const char *pixel, TimestampTz now, TimestampTz *until)
{
	PixelState *st = pixel_state(pixel, false);

	if (st == NULL || st->paused_until <= now)
		return false;
	if (until)
		*until = st->paused_until;
	return true;
}


/*
 * Hold a pixel's rows until "until".  The first pause of a kind is logged;
 * repeats are not, so a long outage does not flood the log.  Rate limits
 * are routine (LOG); credential trouble needs a person (WARNING).
 */
static void
pause_pixel(const char *pixel, TimestampTz until, int kind, const char *why)
{
	PixelState *st = pixel_state(pixel, true);
	bool		routine = (kind == 429 || kind == XCAPI_PAUSE_PACING);
	bool		new_state = st->pause_status != kind || !st->warned ||
		(routine && st->paused_until <= GetCurrentTimestamp());

	if (until > st->paused_until)
		pauses_changed = true;
	st->paused_until = until;
	st->pause_status = kind;
	if (!new_state)
		return;
	st->warned = true;
	if (kind == 429)
		ereport(LOG,
				(errmsg("xcapi: X rate-limited pixel \"%s\"; holding its conversions until %s",
						pixel, timestamptz_to_str(until))));
	else if (kind == XCAPI_PAUSE_PACING)
		ereport(LOG,
				(errmsg("xcapi: pixel \"%s\" used its rate budget (xcapi.rate_limit_events, xcapi.rate_limit_requests); holding its conversions until %s",
						pixel, timestamptz_to_str(until))));
	else
		ereport(WARNING,
				(errmsg("xcapi: cannot send conversions of pixel \"%s\": %s",
						pixel, why),
				 errdetail("Its conversions stay queued and are tried again at %s.",
						   timestamptz_to_str(until)),
				 errhint("Fix the credentials in xcapi.credentials_file and reload the server.")));
}

/* A success ends any pause of the pixel, and says so if one was logged. */
static void
resume_pixel(const char *pixel)
{
	PixelState *st = pixel_state(pixel, false);

	/* a rate budget pause ends by the clock, not by a success */
	if (st == NULL || !st->warned || st->pause_status == XCAPI_PAUSE_PACING)
		return;
	ereport(LOG,
			(errmsg("xcapi: sending conversions of pixel \"%s\" again", pixel)));
	st->warned = false;
	st->pause_status = XCAPI_PAUSE_NONE;
	st->paused_until = 0;
}

/*
 * The pixels paused now, and when each pause ends (for deferring their
 * rows); *earliest_resume is lowered to the first end.
 */
static ArrayType *
paused_pixel_array(TimestampTz now, TimestampTz *earliest_resume,
				   ArrayType **untils, ArrayType **reasons)
{
	HASH_SEQ_STATUS seq;
	PixelState *st;
	Datum	   *items;
	Datum	   *ends;
	Datum	   *whys;
	int			n = 0;
	long		size = hash_get_num_entries(pixel_states) + 1;

	items = palloc(sizeof(Datum) * size);
	ends = palloc(sizeof(Datum) * size);
	whys = palloc(sizeof(Datum) * size);
	hash_seq_init(&seq, pixel_states);
	while ((st = hash_seq_search(&seq)) != NULL)
	{
		const char *why = xcapi_pause_reason(st->pause_status);

		if (st->paused_until > now)
		{
			items[n] = CStringGetTextDatum(st->pixel);
			ends[n] = TimestampTzGetDatum(st->paused_until);
			whys[n++] = CStringGetTextDatum(why ? why : "paused");
			if (st->paused_until < *earliest_resume)
				*earliest_resume = st->paused_until;
		}
	}
	*untils = construct_array(ends, n, TIMESTAMPTZOID, sizeof(TimestampTz),
							  true, TYPALIGN_DOUBLE);
	*reasons = construct_array(whys, n, TEXTOID, -1, false, TYPALIGN_INT);
	return construct_array(items, n, TEXTOID, -1, false, TYPALIGN_INT);
}

/* Full-jitter exponential backoff for the given (counted) attempt. */
static TimestampTz
backoff_until(TimestampTz now, int attempt)
{
	double		ceiling = xcapi_retry_base;

	for (int i = 1; i < attempt && ceiling < xcapi_retry_max; i++)
		ceiling *= 2;
	ceiling = Min(ceiling, (double) xcapi_retry_max);
	return now + (TimestampTz) (pg_prng_double(&pg_global_prng_state) *
								ceiling * 1000.0);
}

static int
compare_claimed(const void *a, const void *b)
{
	const XcapiClaimed *ra = a;
	const XcapiClaimed *rb = b;
	int			r = strcmp(ra->pixel_id, rb->pixel_id);

	if (r != 0)
		return r;
	return ra->id < rb->id ? -1 : ra->id > rb->id ? 1 : 0;
}

static char *
batch_url(const char *pixel)
{
	size_t		len = strlen(xcapi_api_url);

	while (len > 0 && xcapi_api_url[len - 1] == '/')
		len--;
	return psprintf("%.*s/%s/measurement/conversions/%s", (int) len,
					xcapi_api_url, xcapi_api_version, pixel);
}

static void
add_result(List **results, Batch *b, Outcome outcome, int http_status,
		   const char *error, TimestampTz next, bool count_attempt)
{
	/* results outlive the round that produced them */
	MemoryContext old = MemoryContextSwitchTo(loop_context);
	BatchResult *r = palloc(sizeof(BatchResult));

	r->start = b->start;
	r->n = b->n;
	r->outcome = outcome;
	r->http_status = http_status;
	r->error = error ? pstrdup(error) : NULL;
	r->next_attempt = next;
	r->count_attempt = count_attempt;
	*results = lappend(*results, r);
	MemoryContextSwitchTo(old);
}

/* The number of the attempt just made: one more than the most recorded. */
static int
attempt_number(XcapiClaimed *rows, Batch *b)
{
	int			m = 0;

	for (int i = b->start; i < b->start + b->n; i++)
		m = Max(m, rows[i].attempts);
	return m + 1;
}

/*
 * Trim batch b to what the pixel's rate budget allows now and count it
 * against the budget; the rest goes back to the queue, uncounted, due
 * when the budget has room.  Returns false if nothing may go.
 */
static bool
within_budget(XcapiClaimed *rows, Batch *b, TimestampTz now, List **results)
{
	const char *pixel = rows[b->start].pixel_id;
	TimestampTz resume = 0;
	int			allowed = xcapi_pacing_allow(pixel, b->n, now, &resume);
	Batch		rest;

	if (allowed >= b->n)
	{
		/* counted now, so the next batch of this round sees it */
		xcapi_pacing_record(pixel, b->n, now);
		return true;
	}
	if (allowed > 0)
		xcapi_pacing_record(pixel, allowed, now);
	pause_pixel(pixel, resume, XCAPI_PAUSE_PACING, NULL);
	rest.start = b->start + allowed;
	rest.n = b->n - allowed;
	add_result(results, &rest, OUT_RETRY, 0,
			   "held back to stay within the rate budget", resume, false);
	b->n = allowed;
	return allowed > 0;
}

/*
 * Prepare the request of one batch, or decide now that it cannot be sent
 * (paused pixel, no credentials, unsafe URL) and record that.
 */
static XcapiHttpRequest *
prepare_request(XcapiClaimed *rows, Batch *b, TimestampTz now,
				List **results)
{
	const char *pixel = rows[b->start].pixel_id;
	XcapiCredentials cred;
	XcapiHttpRequest *req;
	StringInfoData body;
	char	  **payloads;
	TimestampTz until;

	if (pixel_paused(pixel, now, &until))
	{
		PixelState *st = pixel_state(pixel, false);

		add_result(results, b, OUT_RETRY, 0,
				   psprintf("held back while the pixel is paused: %s",
							xcapi_pause_reason(st->pause_status) ?
							xcapi_pause_reason(st->pause_status) : "unknown"),
				   until, false);
		return NULL;
	}
	if (!api_url_safe)
	{
		const char *why = "refusing to send credentials over plain HTTP to a non-loopback host; set xcapi.api_url to an https:// URL";

		until = now + (TimestampTz) AUTH_PAUSE_SECS * USECS_PER_SEC;
		pause_pixel(pixel, until, XCAPI_PAUSE_UNSAFE_URL, why);
		add_result(results, b, OUT_RETRY, 0,
				   "no usable credentials: xcapi.api_url is plain HTTP to a non-loopback host",
				   until, false);
		return NULL;
	}
	if (!xcapi_credentials_for(pixel, &cred))
	{
		until = now + (TimestampTz) AUTH_PAUSE_SECS * USECS_PER_SEC;
		pause_pixel(pixel, until, XCAPI_PAUSE_NO_CREDENTIALS,
					"xcapi.credentials_file holds no pixel_token and no complete OAuth 1.0a credentials for it");
		add_result(results, b, OUT_RETRY, 0,
				   "no usable credentials for this pixel in xcapi.credentials_file",
				   until, false);
		return NULL;
	}

	if (!within_budget(rows, b, now, results))
		return NULL;

	req = palloc0(sizeof(XcapiHttpRequest));
	req->url = batch_url(pixel);
	payloads = palloc(sizeof(char *) * b->n);
	for (int i = 0; i < b->n; i++)
		payloads[i] = rows[b->start + i].payload;
	initStringInfo(&body);
	xcapi_batch_body(&body, payloads, b->n);
	req->body = body.data;
	req->body_len = body.len;
	if (cred.pixel_token)
		req->auth_header = psprintf("X-Pixel-Token: %s", cred.pixel_token);
	else
	{
		char	   *value = xcapi_oauth_authorization("POST", req->url,
													  cred.consumer_key,
													  cred.consumer_secret,
													  cred.access_token,
													  cred.access_token_secret,
													  NULL, -1);

		req->auth_header = psprintf("Authorization: %s", value);
	}
	return req;
}

static char *
describe_failure(XcapiHttpRequest *req)
{
	char	   *x_says;

	if (req->http_status == 0)
		return psprintf("request failed: %s", req->transport_error);
	x_says = xcapi_error_messages(req->response.data, req->response.len);
	if (x_says[0] == '\0')
		return psprintf("HTTP %ld", req->http_status);
	return psprintf("HTTP %ld: %s", req->http_status, x_says);
}

/*
 * Decide what one answer means for its batch; may queue split halves on
 * *pending.
 */
static void
classify(XcapiClaimed *rows, Batch *b, XcapiHttpRequest *req,
		 TimestampTz now, List **pending, List **results)
{
	const char *pixel = rows[b->start].pixel_id;
	long		status = req->http_status;
	PixelState *st = pixel_state(pixel, true);

	st->last_http_status = (int) status;
	if (status >= 200 && status < 300)
	{
		char	   *account = xcapi_response_account_id(req->response.data,
														req->response.len);

		st->last_success = now;
		if (account)
			xcapi_pacing_learn_account(pixel, account);
		resume_pixel(pixel);
		add_result(results, b, OUT_SENT, (int) status, NULL, 0, false);
		/* X says the budget is spent: wait for its reset, not for a 429 */
		if (req->rate_limit_remaining == 0 &&
			req->rate_limit_reset > (int64) time(NULL))
			pause_pixel(pixel, now + (TimestampTz) (req->rate_limit_reset -
													(int64) time(NULL)) * USECS_PER_SEC,
						429, NULL);
	}
	else if ((status == 400 || status == 413) && b->n > 1)
	{
		Batch	   *left = MemoryContextAlloc(loop_context, sizeof(Batch));
		Batch	   *right = MemoryContextAlloc(loop_context, sizeof(Batch));

		left->start = b->start;
		left->n = b->n / 2;
		right->start = b->start + left->n;
		right->n = b->n - left->n;
		*pending = lcons(right, *pending);
		*pending = lcons(left, *pending);
	}
	else if (status == 400 || status == 413 || status == 404)
		add_result(results, b, OUT_DEAD, (int) status, describe_failure(req),
				   0, false);
	else if (status == 401 || status == 403)
	{
		TimestampTz until = now + (TimestampTz) AUTH_PAUSE_SECS * USECS_PER_SEC;
		char	   *why = describe_failure(req);

		pause_pixel(pixel, until, (int) status,
					psprintf("X refused the credentials (%s)", why));
		add_result(results, b, OUT_RETRY, (int) status, why, until, false);
	}
	else if (status == 429)
	{
		int64		now_epoch = (int64) time(NULL);
		int64		wait_secs = RATE_LIMIT_DEFAULT_SECS;
		TimestampTz until;

		if (req->rate_limit_reset > now_epoch)
			wait_secs = req->rate_limit_reset - now_epoch;
		else if (req->retry_after >= 0)
			wait_secs = req->retry_after;
		until = now + (TimestampTz) Max(wait_secs, 1) * USECS_PER_SEC;
		pause_pixel(pixel, until, 429, NULL);
		add_result(results, b, OUT_RETRY, 429, describe_failure(req), until,
				   false);
	}
	else if (req->resend_refused)
	{
		/* a stale kept-alive connection, not a failure of X: again at once */
		add_result(results, b, OUT_RETRY, 0, describe_failure(req), now,
				   false);
	}
	else
	{
		TimestampTz next = backoff_until(now, attempt_number(rows, b));

		if (req->retry_after > 0)
			next = Max(next, now + (TimestampTz) req->retry_after * USECS_PER_SEC);
		add_result(results, b, OUT_RETRY, (int) status, describe_failure(req),
				   next, true);
	}
}

/*
 * Send the claimed rows: max_inflight requests at a time until every batch
 * (and every half of a split batch) has an outcome.
 */
static List *
send_batches(XcapiClaimed *rows, List *pending)
{
	List	   *results = NIL;
	uint64		requests = 0;
	uint64		sent = 0;
	uint64		retries = 0;
	long		last_status = 0;

	while (pending != NIL)
	{
		XcapiHttpRequest **reqs;
		Batch	  **batches;
		int			n = 0;
		TimestampTz now = GetCurrentTimestamp();
		MemoryContext old = MemoryContextSwitchTo(round_context);

		reqs = palloc(sizeof(XcapiHttpRequest *) * xcapi_max_inflight);
		batches = palloc(sizeof(Batch *) * xcapi_max_inflight);
		while (pending != NIL && n < xcapi_max_inflight)
		{
			Batch	   *b = linitial(pending);
			XcapiHttpRequest *req;

			pending = list_delete_first(pending);
			req = prepare_request(rows, b, now, &results);
			if (req)
			{
				reqs[n] = req;
				batches[n++] = b;
			}
		}

		if (n > 0)
		{
			pgstat_report_activity(STATE_RUNNING, "sending conversions");
			xcapi_http_perform(reqs, n);
			now = GetCurrentTimestamp();
			for (int i = 0; i < n; i++)
			{
				explicit_bzero(reqs[i]->auth_header, strlen(reqs[i]->auth_header));
				requests++;
				last_status = reqs[i]->http_status;
				if (last_status >= 200 && last_status < 300)
					sent += batches[i]->n;
				else
					retries++;
				MemoryContextSwitchTo(loop_context);
				classify(rows, batches[i], reqs[i], now, &pending, &results);
				MemoryContextSwitchTo(round_context);
			}
		}
		MemoryContextSwitchTo(old);
		MemoryContextReset(round_context);
	}

	SpinLockAcquire(&xcapi_shared->mutex);
	xcapi_shared->requests += requests;
	xcapi_shared->conversions_sent += sent;
	xcapi_shared->retries += retries;
	if (requests > 0)
		xcapi_shared->last_http_status = (int) last_status;
	SpinLockRelease(&xcapi_shared->mutex);
	return results;
}

static void
begin_transaction(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
end_transaction(void)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(loop_context);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Record every outcome in one transaction: all sent rows in one statement
 * (the common case), the others per batch.
 */
static void
record_results(XcapiClaimed *rows, int nrows, List *results)
{
	int64	   *sent_ids = palloc(sizeof(int64) * Max(nrows, 1));
	int			nsent = 0;
	int			sent_status = 200;
	ListCell   *lc;

	begin_transaction("recording conversions");
	foreach(lc, results)
	{
		BatchResult *r = lfirst(lc);
		int64	   *ids;

		if (r->outcome == OUT_SENT)
		{
			for (int i = 0; i < r->n; i++)
				sent_ids[nsent++] = rows[r->start + i].id;
			sent_status = r->http_status;
			continue;
		}
		ids = palloc(sizeof(int64) * r->n);
		for (int i = 0; i < r->n; i++)
			ids[i] = rows[r->start + i].id;
		if (r->outcome == OUT_RETRY)
			xcapi_outbox_mark_retry(ids, r->n, r->http_status,
									r->error ? r->error : "held back",
									r->next_attempt, r->count_attempt);
		else
			xcapi_outbox_mark_dead(ids, r->n, r->http_status, r->error);
		pfree(ids);
	}
	if (nsent > 0)
		xcapi_outbox_mark_sent(sent_ids, nsent, sent_status);
	end_transaction();
}

/*
 * Copy the per-pixel state into shared memory for xcapi_pixel_state().
 */
static void
publish_pixel_states(void)
{
	HASH_SEQ_STATUS seq;
	PixelState *st;
	int			n = 0;
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&xcapi_shared->mutex);
	hash_seq_init(&seq, pixel_states);
	while ((st = hash_seq_search(&seq)) != NULL)
	{
		XcapiPixelShared *out;
		const char *account;

		if (n == XCAPI_MAX_SHARED_PIXELS)
		{
			hash_seq_term(&seq);
			break;
		}
		out = &xcapi_shared->pixels[n++];
		account = xcapi_pacing_account(st->pixel);
		strlcpy(out->pixel, st->pixel, sizeof(out->pixel));
		strlcpy(out->account, account ? account : "", sizeof(out->account));
		out->paused_until = st->paused_until;
		out->pause_kind = st->pause_status;
		out->last_success = st->last_success;
		out->last_http_status = st->last_http_status;
	}
	xcapi_shared->npixels = n;

	/* the pixels paused now, so commits for them alone do not wake us */
	n = 0;
	hash_seq_init(&seq, pixel_states);
	while ((st = hash_seq_search(&seq)) != NULL)
	{
		if (st->paused_until <= now)
			continue;
		if (n == XCAPI_MAX_SHARED_PIXELS)
		{
			hash_seq_term(&seq);
			break;
		}
		xcapi_shared->paused_hash[n++] = xcapi_pixel_hash(st->pixel);
	}
	xcapi_shared->npaused = n;
	SpinLockRelease(&xcapi_shared->mutex);
}

/*
 * Delete sent rows past xcapi.retention, a batch at a time.  A full batch
 * means more are waiting: go on at once.  A partial one means the oldest
 * rows are gone: look again in a minute.  None at all means nothing is old
 * enough yet, and finding that out walked the table: wait longer (a tenth
 * of the retention, between a minute and an hour) before looking again.
 */
static void
maybe_purge(void)
{
	TimestampTz now = GetCurrentTimestamp();
	int			n;
	int64		wait_secs;

	if (xcapi_retention <= 0)
		return;
	if (!purge_pending && now < next_purge)
		return;

	begin_transaction("purging sent conversions");
	n = xcapi_outbox_lookup_schema() ?
		xcapi_outbox_purge(xcapi_retention, PURGE_BATCH) : 0;
	end_transaction();

	purge_pending = (n == PURGE_BATCH);
	if (n > 0)
		wait_secs = PURGE_INTERVAL_SECS;
	else
		wait_secs = Min(Max(xcapi_retention / 10, PURGE_INTERVAL_SECS), 3600);
	next_purge = now + (TimestampTz) wait_secs * USECS_PER_SEC;
}

/*
 * Leave at least xcapi.batch_delay between two claims, unless the last one
 * was full (a backlog is drained at full speed).  Under a stream of
 * commits this lets the conversions of many commits share one request,
 * which spares X's request budget and the worker's CPU; an isolated
 * commit is not delayed, the previous claim being long past.  The latch
 * stays set meanwhile, so nothing is missed.
 */
static void
wait_batch_delay(void)
{
	long		ms;

	int			delay = xcapi_batch_delay;

	/*
	 * Commits for a paused pixel keep waking the worker in vain: each claim
	 * finds nothing.  Space those claims out further.
	 */
	if (last_claim_blocked)
		delay = Max(delay, BLOCKED_CLAIM_INTERVAL_MS);
	if (delay <= 0 || last_claim == 0 || last_claim_full || intake_backlog)
		return;
	ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
										 last_claim + (TimestampTz) delay * 1000);
	if (ms > 0)
		(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, ms,
						 PG_WAIT_EXTENSION);
}

/*
 * File a chunk of the intake (see xcapi_outbox_file_intake) in a
 * subtransaction.  If filing fails (say, a trigger or constraint someone
 * added to xcapi_conversions rejects a row), the rows stay in the intake,
 * still queued and visible in xcapi_conversions and xcapi_stats, one
 * WARNING says why, and the worker goes on sending what was filed before
 * and tries again at its next iteration, rather than exiting on the error
 * and restarting into it every second.  Returns whether more rows may be
 * waiting.
 */
static bool
file_intake(void)
{
	MemoryContext caller = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	bool		more = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(caller);
	PG_TRY();
	{
		more = xcapi_outbox_file_intake(FILE_CHUNK);
		ReleaseCurrentSubTransaction();
		filing_failure_logged = false;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		if (!filing_failure_logged)
			ereport(WARNING,
					(errmsg("xcapi: could not file new conversions into xcapi_conversions: %s",
							edata->message),
					 errdetail("They stay queued in xcapi_conversions_intake and are not sent until they can be filed."),
					 errhint("Look for a trigger, rule or constraint added to xcapi_conversions; the worker tries again at each wake-up.")));
		filing_failure_logged = true;
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	CurrentResourceOwner = owner;
	return more;
}

/*
 * One iteration.  Returns how long to sleep in ms: 0 to go on at once.
 */
static long
run_once(void)
{
	XcapiClaimed *rows = NULL;
	int			nrows;
	int			limit = xcapi_batch_size * xcapi_max_inflight;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz wake = now + (TimestampTz) xcapi_naptime * USECS_PER_SEC;
	ArrayType  *paused;
	ArrayType  *paused_until;
	ArrayType  *paused_why;
	List	   *pending = NIL;

	wait_batch_delay();
	begin_transaction("claiming conversions");
	MemoryContextSwitchTo(loop_context);
	if (!xcapi_outbox_lookup_schema())
	{
		if (!extension_missing_logged)
			ereport(LOG,
					(errmsg("xcapi: extension \"xcapi\" is not installed in database \"%s\"; waiting for CREATE EXTENSION",
							xcapi_database)));
		extension_missing_logged = true;
		end_transaction();
		return xcapi_naptime * 1000L;
	}
	extension_missing_logged = false;
	if (!repaired)
	{
		int			n = xcapi_outbox_repair();

		if (n > 0)
			ereport(LOG,
					(errmsg("xcapi: re-queued %d conversions that were in flight when the previous worker stopped",
							n)));
		repaired = true;
	}
	if (credentials_changed)
	{
		Datum	   *items = palloc(sizeof(Datum) * (list_length(released_pixels) + 1));
		int			n = 0;
		ListCell   *lc;

		foreach(lc, released_pixels)
			items[n++] = CStringGetTextDatum((char *) lfirst(lc));
		xcapi_outbox_release_auth_pauses(construct_array(items, n, TEXTOID, -1,
														 false, TYPALIGN_INT));
		list_free_deep(released_pixels);
		released_pixels = NIL;
		credentials_changed = false;
	}

	/*
	 * New conversions arrive in the intake, which has no index (cheap for
	 * the inserting transaction); file them where claims can find them.
	 * A large intake goes a chunk per iteration, between sends.
	 */
	intake_backlog = file_intake();

	/*
	 * While a backlog is being filed and the last claim found only rows of
	 * paused pixels, go on filing without claiming: each claim would walk
	 * over the held rows again and each deferral rewrite another chunk of
	 * them.  Claims resume when the intake is empty, or at once after a
	 * reload that may have lifted the pauses.
	 */
	if (intake_backlog && last_claim_blocked)
	{
		end_transaction();
		return 0;
	}

	paused = paused_pixel_array(now, &wake, &paused_until, &paused_why);

	/*
	 * Rows of a paused pixel are due but cannot go; left due, every claim
	 * would walk over them again.  Move them to the end of the pause: after
	 * a new pause, when the last claim found nothing although some were
	 * due, and every DEFER_INTERVAL_MS for rows that arrived meanwhile.
	 */
	if (ARR_NDIM(paused) > 0 &&
		(pauses_changed || last_claim_blocked ||
		 now - last_defer >= (TimestampTz) DEFER_INTERVAL_MS * 1000))
	{
		xcapi_outbox_defer(paused, paused_until, paused_why);
		last_defer = now;
	}
	pauses_changed = false;

	nrows = xcapi_outbox_claim(limit, paused, &rows);
	last_claim = GetCurrentTimestamp();
	last_claim_full = (nrows == limit);
	/* an empty array has no dimensions */
	last_claim_blocked = (nrows == 0 && ARR_NDIM(paused) > 0);
	if (nrows == 0)
	{
		TimestampTz due = xcapi_outbox_next_due(paused, wake);

		if (due < wake)
			wake = due;
	}
	end_transaction();

	maybe_purge();
	if (nrows == 0)
	{
		publish_pixel_states();
		if (purge_pending || intake_backlog)
			return 0;
		return Max(TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
												   wake), 0);
	}

	/* one pixel per request: batches are runs of one pixel, in id order */
	qsort(rows, nrows, sizeof(XcapiClaimed), compare_claimed);
	for (int i = 0; i < nrows;)
	{
		Batch	   *b = palloc(sizeof(Batch));

		b->start = i;
		b->n = 1;
		while (i + b->n < nrows && b->n < xcapi_batch_size &&
			   strcmp(rows[i].pixel_id, rows[i + b->n].pixel_id) == 0)
			b->n++;
		pending = lappend(pending, b);
		i += b->n;
	}

	record_results(rows, nrows, send_batches(rows, pending));
	publish_pixel_states();
	return 0;
}

static void
reload_configuration(void)
{
	char	   *old_url = pstrdup(xcapi_api_url);
	char	   *old_ca = pstrdup(xcapi_ca_file);

	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (strcmp(old_url, xcapi_api_url) != 0 || strcmp(old_ca, xcapi_ca_file) != 0)
		xcapi_http_reset_connections();
	pfree(old_url);
	pfree(old_ca);

	/* new credentials: lift credential pauses and try held rows at once */
	xcapi_credentials_load();
	/* the URL only changes on reload: parse it then, not per request */
	api_url_safe = xcapi_http_url_is_safe(xcapi_api_url);
	{
		HASH_SEQ_STATUS seq;
		PixelState *st;

		hash_seq_init(&seq, pixel_states);
		while ((st = hash_seq_search(&seq)) != NULL)
		{
			if (st->pause_status == XCAPI_PAUSE_NO_CREDENTIALS ||
				st->pause_status == XCAPI_PAUSE_UNSAFE_URL ||
				st->pause_status == 401 || st->pause_status == 403)
			{
				MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

				released_pixels = lappend(released_pixels, pstrdup(st->pixel));
				MemoryContextSwitchTo(old);
				st->paused_until = 0;
				st->warned = false;
				st->pause_status = XCAPI_PAUSE_NONE;
			}
		}
	}
	credentials_changed = true;
	last_claim_blocked = false; /* the pauses may be lifted: claim again */
	next_purge = 0;				/* xcapi.retention may have changed */
	/* commits for the released pixels must wake the worker again */
	publish_pixel_states();
}

void
xcapi_worker_main(Datum main_arg)
{
	HASHCTL		ctl;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(xcapi_database, NULL, 0);
	pgstat_report_appname("xcapi worker");

	/*
	 * The worker's own status changes need not wait for a WAL flush: if a
	 * crash loses the last few, rows fall back to queued or sending and are
	 * sent again with the same conversion_id, which at-least-once allows.
	 * The conversions themselves are committed by their callers as usual.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * The worker's statements walk the due index in order and stop early.
	 * A bitmap scan would revisit every dead index entry left by earlier
	 * updates each time (only plain index scans mark them dead), which made
	 * a paused pixel's backlog cost a core (measured under pgbench).
	 */
	SetConfigOption("enable_bitmapscan", "off", PGC_SUSET, PGC_S_OVERRIDE);
	advertise_worker();

	loop_context = AllocSetContextCreate(TopMemoryContext, "xcapi worker loop",
										 ALLOCSET_DEFAULT_SIZES);
	round_context = AllocSetContextCreate(TopMemoryContext, "xcapi worker round",
										  ALLOCSET_DEFAULT_SIZES);
	ctl.keysize = 65;
	ctl.entrysize = sizeof(PixelState);
	ctl.hcxt = TopMemoryContext;
	pixel_states = hash_create("xcapi pixel states", 64, &ctl,
							   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	xcapi_http_init();
	xcapi_credentials_load();
	/* the URL only changes on reload: parse it then, not per request */
	api_url_safe = xcapi_http_url_is_safe(xcapi_api_url);
	ereport(LOG,
			(errmsg("xcapi worker started in database \"%s\", sending to %s",
					xcapi_database, xcapi_api_url)));

	for (;;)
	{
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
			reload_configuration();

		MemoryContextReset(loop_context);
		MemoryContextSwitchTo(loop_context);

		if (RecoveryInProgress())
			sleep_ms = xcapi_naptime * 1000L;
		else
			sleep_ms = run_once();

		if (sleep_ms > 0)
		{
			(void) WaitLatch(MyLatch,
							 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
	}
}
