/*-------------------------------------------------------------------------
 *
 * monitor.c
 *		What the worker is doing, from shared memory: xcapi_worker_state()
 *		and xcapi_pixel_state().
 *
 * The worker publishes its counters and per-pixel state (paused until
 * when, and why; last answer; last success) after every iteration.  These
 * functions copy a consistent snapshot under the spinlock and return it;
 * they never wait for the worker.  Without the preloaded library there is
 * no shared state and they return nothing.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/monitor.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(xcapi_worker_state);
PG_FUNCTION_INFO_V1(xcapi_pixel_state);

const char *
xcapi_pause_reason(int kind)
{
	switch (kind)
	{
		case XCAPI_PAUSE_NO_CREDENTIALS:
			return "no usable credentials";
		case XCAPI_PAUSE_PACING:
			return "rate budget spent";
		case XCAPI_PAUSE_UNSAFE_URL:
			return "xcapi.api_url is plain HTTP to a non-loopback host";
		case 401:
		case 403:
			return "credentials rejected";
		case 429:
			return "rate-limited by X";
		default:
			return NULL;
	}
}

/*
 * xcapi_worker_state(): pid, started_at, requests, conversions_sent,
 * retries, last_http_status, paused_until (the latest end of any current
 * pixel pause).  One row; all NULL when no worker has run.
 */
Datum
xcapi_worker_state(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[7] = {0};
	bool		nulls[7] = {true, true, true, true, true, true, true};
	TimestampTz now = GetCurrentTimestamp();

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	if (xcapi_shared != NULL)
	{
		TimestampTz paused_until = 0;

		SpinLockAcquire(&xcapi_shared->mutex);
		if (xcapi_shared->worker_pid != 0)
		{
			values[0] = Int32GetDatum(xcapi_shared->worker_pid);
			nulls[0] = false;
		}
		if (xcapi_shared->worker_started != 0)
		{
			values[1] = TimestampTzGetDatum(xcapi_shared->worker_started);
			values[2] = Int64GetDatum((int64) xcapi_shared->requests);
			values[3] = Int64GetDatum((int64) xcapi_shared->conversions_sent);
			values[4] = Int64GetDatum((int64) xcapi_shared->retries);
			nulls[1] = nulls[2] = nulls[3] = nulls[4] = false;
		}
		if (xcapi_shared->last_http_status != 0)
		{
			values[5] = Int32GetDatum(xcapi_shared->last_http_status);
			nulls[5] = false;
		}
		for (int i = 0; i < xcapi_shared->npixels; i++)
			if (xcapi_shared->pixels[i].paused_until > now)
				paused_until = Max(paused_until,
								   xcapi_shared->pixels[i].paused_until);
		SpinLockRelease(&xcapi_shared->mutex);
		if (paused_until != 0)
		{
			values[6] = TimestampTzGetDatum(paused_until);
			nulls[6] = false;
		}
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

/*
 * xcapi_pixel_state(): one row per pixel the worker has dealt with since
 * it started: pixel_id, account_id, paused_until, pause_reason,
 * last_success_at, last_http_status.
 */
Datum
xcapi_pixel_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	XcapiPixelShared copy[XCAPI_MAX_SHARED_PIXELS];
	int			n = 0;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, 0);
	if (xcapi_shared == NULL)
		return (Datum) 0;

	SpinLockAcquire(&xcapi_shared->mutex);
	n = xcapi_shared->npixels;
	memcpy(copy, xcapi_shared->pixels, sizeof(XcapiPixelShared) * n);
	SpinLockRelease(&xcapi_shared->mutex);

	for (int i = 0; i < n; i++)
	{
		Datum		values[6] = {0};
		bool		nulls[6] = {false, true, true, true, true, true};
		bool		paused = copy[i].paused_until > now &&
			xcapi_pause_reason(copy[i].pause_kind) != NULL;

		values[0] = CStringGetTextDatum(copy[i].pixel);
		if (copy[i].account[0])
		{
			values[1] = CStringGetTextDatum(copy[i].account);
			nulls[1] = false;
		}
		if (paused)
		{
			values[2] = TimestampTzGetDatum(copy[i].paused_until);
			values[3] = CStringGetTextDatum(xcapi_pause_reason(copy[i].pause_kind));
			nulls[2] = nulls[3] = false;
		}
		if (copy[i].last_success != 0)
		{
			values[4] = TimestampTzGetDatum(copy[i].last_success);
			nulls[4] = false;
		}
		if (copy[i].last_http_status != 0)
		{
			values[5] = Int32GetDatum(copy[i].last_http_status);
			nulls[5] = false;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
