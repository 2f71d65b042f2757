/*-------------------------------------------------------------------------
 *
 * xcapi.c
 *		Module load: settings, shared memory, the worker, and waking it.
 *
 * Loaded through shared_preload_libraries, xcapi registers one background
 * worker and a small shared block holding the worker's latch.  A backend
 * that queues conversions sets that latch when its transaction commits
 * (never before, never on rollback), so delivery starts at once without
 * polling.  Loaded any other way, enqueueing still works but nothing is
 * sent, and xcapi_fire says so once per transaction.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/xcapi.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include "access/xact.h"
#include "common/hashfn.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

char	   *xcapi_database = NULL;
char	   *xcapi_api_url = NULL;
char	   *xcapi_api_version = NULL;
int			xcapi_batch_size = XCAPI_MAX_BATCH;
char	   *xcapi_ca_file = NULL;
char	   *xcapi_credentials_file = NULL;
int			xcapi_max_inflight = 4;
int			xcapi_connect_timeout = 5000;
int			xcapi_request_timeout = 30000;
int			xcapi_max_attempts = 12;
int			xcapi_retry_base = 1000;
int			xcapi_retry_max = 600000;
int			xcapi_naptime = 10;
int			xcapi_batch_delay = 2;
int			xcapi_rate_limit_events = 60000;
int			xcapi_rate_limit_requests = 100000;
int			xcapi_rate_window = 900;
int			xcapi_retention = 7 * 24 * 3600;

XcapiShared *xcapi_shared = NULL;
bool		xcapi_preloaded = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Per-transaction state of this backend. */
static bool wake_at_commit = false;
static bool fired_this_xact = false;

/*
 * Pixels this transaction queued for (hashes), to skip waking the worker
 * for a commit that only concerns paused pixels.  Past MAX_FIRED_PIXELS
 * distinct pixels the commit just wakes it.
 */
#define MAX_FIRED_PIXELS 8
static uint32 fired_pixels[MAX_FIRED_PIXELS];
static int	nfired_pixels = 0;
static bool fired_pixels_overflow = false;
static bool warned_this_xact = false;

void		_PG_init(void);

static void
define_settings(void)
{
	/* a postmaster-level setting can only be defined while preloading */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomStringVariable("xcapi.database",
								   "Database the xcapi worker connects to.",
								   "The extension must be created in this database.",
								   &xcapi_database, "postgres",
								   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("xcapi.api_url",
							   "Base URL of X's Ads API.",
							   NULL, &xcapi_api_url, "https://ads-api.x.com",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("xcapi.api_version",
							   "Ads API version: the first path element of the URL.",
							   NULL, &xcapi_api_version, "12",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.batch_size",
							"Most conversions sent in one request.",
							"X accepts at most 500.",
							&xcapi_batch_size, XCAPI_MAX_BATCH, 1,
							XCAPI_MAX_BATCH,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("xcapi.ca_file",
							   "Extra CA certificate file to trust, next to the system's.",
							   "Certificate verification is never switched off.",
							   &xcapi_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("xcapi.credentials_file",
							   "File holding X credentials, readable by its owner only.",
							   "Secrets are never setting values: changed values are logged on reload.",
							   &xcapi_credentials_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.max_inflight",
							"Most requests the worker has in flight at once.",
							NULL, &xcapi_max_inflight, 4, 1, 64,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.connect_timeout",
							"Time allowed to connect to X.",
							NULL, &xcapi_connect_timeout, 5000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.request_timeout",
							"Time allowed for one request, connection included.",
							NULL, &xcapi_request_timeout, 30000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.max_attempts",
							"Attempts before a conversion that keeps failing is dead.",
							NULL, &xcapi_max_attempts, 12, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.retry_base",
							"First retry delay; it doubles with each attempt.",
							NULL, &xcapi_retry_base, 1000, 10, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.retry_max",
							"Longest retry delay.",
							NULL, &xcapi_retry_max, 600000, 10, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.naptime",
							"Longest idle wait of the worker between checks of the queue.",
							"Commits wake the worker at once; this is a safety net.",
							&xcapi_naptime, 10, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.batch_delay",
							"Least time between two claims of the worker.",
							"Under a stream of commits, conversions committed meanwhile share a request instead of one request each.",
							&xcapi_batch_delay, 2, 0, 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.rate_limit_events",
							"Most conversions sent per ad account per rate window; 0 for no limit.",
							"X's guide allows 60,000 events per account per 15 minutes.",
							&xcapi_rate_limit_events, 60000, 0, INT_MAX,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.rate_limit_requests",
							"Most requests sent per ad account per rate window; 0 for no limit.",
							"X's v12 reference allows 100,000 requests per account per 15 minutes.",
							&xcapi_rate_limit_requests, 100000, 0, INT_MAX,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.rate_window",
							"Length of the rate-limit window.",
							NULL, &xcapi_rate_window, 900, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("xcapi.retention",
							"How long sent conversions stay in the outbox; 0 keeps them.",
							"Dead conversions are kept until retried or deleted by hand.",
							&xcapi_retention, 7 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("xcapi");
}

static void
xcapi_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(XcapiShared)));
}

static void
xcapi_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	xcapi_shared = ShmemInitStruct("xcapi", sizeof(XcapiShared), &found);
	if (!found)
	{
		memset(xcapi_shared, 0, sizeof(XcapiShared));
		SpinLockInit(&xcapi_shared->mutex);
		/* block 0: the worker's first pass reads the whole intake */
		pg_atomic_init_u32(&xcapi_shared->intake_low_block, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

static void
register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* not on a standby: it starts when (or if) the server is promoted */
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	strlcpy(worker.bgw_library_name, "xcapi", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "xcapi_worker_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "xcapi worker", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "xcapi worker", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * True if every conversion this transaction queued is for a pixel the
 * worker holds back right now: waking it would only make it find nothing
 * to send (it wakes by itself when the pause ends).  Under a flood of
 * commits for a pixel whose credentials are missing, this keeps the worker
 * asleep instead of busy.
 */
static bool
only_paused_pixels_fired(void)
{
	bool		all_paused = true;

	if (xcapi_shared == NULL || fired_pixels_overflow || nfired_pixels == 0)
		return false;
	SpinLockAcquire(&xcapi_shared->mutex);
	for (int i = 0; i < nfired_pixels && all_paused; i++)
	{
		bool		found = false;

		for (int j = 0; j < xcapi_shared->npaused && !found; j++)
			found = (xcapi_shared->paused_hash[j] == fired_pixels[i]);
		all_paused = found;
	}
	SpinLockRelease(&xcapi_shared->mutex);
	return all_paused;
}

/*
 * At commit, wake the worker if this transaction queued something; at the
 * end of any transaction, forget the per-transaction state.
 */
static void
xcapi_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_at_commit && !only_paused_pixels_fired())
				xcapi_wake_worker();
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			wake_at_commit = false;
			fired_this_xact = false;
			nfired_pixels = 0;
			fired_pixels_overflow = false;
			warned_this_xact = false;
			break;
		default:
			break;
	}
}

void
_PG_init(void)
{
	define_settings();
	RegisterXactCallback(xcapi_xact_callback, NULL);
	xcapi_outbox_init();

	if (!process_shared_preload_libraries_in_progress)
		return;
	xcapi_preloaded = true;
	if (IsBinaryUpgrade)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = xcapi_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = xcapi_shmem_startup;
	register_worker();
}

/* Set the worker's latch, if there is a worker. */
void
xcapi_wake_worker(void)
{
	Latch	   *latch = NULL;

	if (xcapi_shared == NULL)
		return;
	SpinLockAcquire(&xcapi_shared->mutex);
	if (xcapi_shared->worker_pid != 0)
		latch = xcapi_shared->worker_latch;
	SpinLockRelease(&xcapi_shared->mutex);
	if (latch)
		SetLatch(latch);
}

void
xcapi_wake_worker_at_commit(void)
{
	wake_at_commit = true;
}

/*
 * Called for each queued conversion.  Without the preloaded worker nothing
 * would ever be sent: say so, once per transaction.
 */
uint32
xcapi_pixel_hash(const char *pixel)
{
	return DatumGetUInt32(hash_any((const unsigned char *) pixel,
								   strlen(pixel)));
}

void
xcapi_note_fired(const char *pixel)
{
	uint32		h = xcapi_pixel_hash(pixel);
	bool		known = false;

	fired_this_xact = true;
	wake_at_commit = true;
	for (int i = 0; i < nfired_pixels && !known; i++)
		known = (fired_pixels[i] == h);
	if (!known)
	{
		if (nfired_pixels < MAX_FIRED_PIXELS)
			fired_pixels[nfired_pixels++] = h;
		else
			fired_pixels_overflow = true;
	}
	if (!xcapi_preloaded && !warned_this_xact)
	{
		warned_this_xact = true;
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("xcapi is not loaded via shared_preload_libraries, so queued conversions will not be sent"),
				 errdetail("The conversion was queued and will be sent once the xcapi worker runs."),
				 errhint("Add xcapi to shared_preload_libraries, set xcapi.database, and restart the server.")));
	}
}

bool
xcapi_fired_in_this_transaction(void)
{
	return fired_this_xact;
}
