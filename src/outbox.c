/*-------------------------------------------------------------------------
 *
 * outbox.c
 *		Every SQL statement on the outbox table xcapi_conversions.
 *
 * The worker reads due rows in one short read-only statement, sends them
 * outside any transaction, and records each outcome with one set-based
 * UPDATE: sent, back to the queue with a later next_attempt_at, or dead.
 * Rows stay 'queued' while in flight: there is one worker, which knows
 * what it has in flight, and a worker that dies mid-send leaves nothing to
 * repair: the rows are simply due again, so a committed conversion ends
 * 'sent' or 'dead' and never vanishes.  Each row is thus written twice in
 * its life (insert, outcome), not three times.  A resend carries the same
 * stored payload, hence the same conversion_id, which is what X
 * deduplicates on.  ('sending' is what workers of version 0.1.0 wrote;
 * rows in it are repaired at start and accepted by every outcome.)
 *
 * Callers are inside a transaction with a snapshot.  Plans are prepared
 * once per schema and kept.  Every name is schema-qualified with the
 * extension's schema, looked up in pg_extension.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/outbox.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/skey.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/heapam.h"
#include "access/genam.h"
#include "catalog/index.h"
#include "catalog/indexing.h"
#include "catalog/pg_index.h"
#include "utils/rel.h"
#include "catalog/pg_extension.h"
#include "utils/fmgroids.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/sequence.h"
#include "catalog/pg_class.h"
#include "utils/syscache.h"
#include "utils/inval.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(xcapi_wait);
PG_FUNCTION_INFO_V1(xcapi_retry);

typedef enum OutboxPlan
{
	PLAN_INSERT,
	PLAN_CLAIM,
	PLAN_NEXT_DUE,
	PLAN_SENT,
	PLAN_RETRY,
	PLAN_DEAD,
	PLAN_PENDING,
	PLAN_PURGE,
	PLAN_DEFER,
	NUM_PLANS
} OutboxPlan;

static char *schema_name = NULL;	/* quoted, in TopMemoryContext */
static Oid	schema_oid = InvalidOid;
static Oid	table_oid = InvalidOid;
static Oid	table_owner = InvalidOid;
static Oid	sequence_oid = InvalidOid;
static bool direct_insert = false;	/* see can_insert_directly() */
static bool lookup_valid = false;	/* until an invalidation says otherwise */
static bool callbacks_registered = false;
static SPIPlanPtr plans[NUM_PLANS];

/* The schema of extension ext (not exported by PostgreSQL 15). */
static Oid
extension_schema(Oid ext)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			nsp = InvalidOid;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(ext));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		nsp = ((Form_pg_extension) GETSTRUCT(tup))->extnamespace;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return nsp;
}

/* The outbox's columns in the order xcapi fills them. */
static const char *const outbox_columns[] = {
	"id", "pixel_id", "event_id", "conversion_id", "conversion_time",
	"payload", "status", "attempts", "next_attempt_at", "last_attempt_at",
	"last_http_status", "last_error", "created_at", "sent_at"
};

#define NUM_OUTBOX_COLUMNS lengthof(outbox_columns)

static AttrNumber outbox_attnums[NUM_OUTBOX_COLUMNS];

/* The outbox's indexes, looked up with the table (see can_insert_directly). */
static MemoryContext index_cache_context = NULL;
static int	n_outbox_indexes = 0;
static Oid	outbox_index_oids[INDEX_MAX_KEYS];
static IndexInfo *outbox_index_infos[INDEX_MAX_KEYS];
static bool outbox_index_unique[INDEX_MAX_KEYS];

/*
 * Whether xcapi_fire may form the row itself and insert it into the heap
 * and the indexes, skipping the executor: about five times cheaper per
 * row than an INSERT through SPI, which is what a trigger on a busy table
 * pays.  Only when the table is exactly what xcapi created: a plain table
 * with the expected columns and no other column, no trigger or rule, and
 * plain indexes (no expression, no predicate).  Otherwise the SPI INSERT,
 * which honours everything, is used.
 */
static bool
can_insert_directly(Oid table)
{
	Relation	rel = table_open(table, AccessShareLock);
	TupleDesc	desc = RelationGetDescr(rel);
	bool		ok = rel->rd_rel->relkind == RELKIND_RELATION &&
		rel->trigdesc == NULL && !rel->rd_rel->relhasrules &&
		!rel->rd_rel->relrowsecurity;
	List	   *indexes;
	ListCell   *lc;
	int			live = 0;

	for (int i = 0; ok && i < (int) NUM_OUTBOX_COLUMNS; i++)
	{
		outbox_attnums[i] = get_attnum(table, outbox_columns[i]);
		ok = outbox_attnums[i] != InvalidAttrNumber;
	}
	for (int i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped)
			live++;
	ok = ok && live == (int) NUM_OUTBOX_COLUMNS;

	if (index_cache_context == NULL)
		index_cache_context = AllocSetContextCreate(TopMemoryContext,
													"xcapi outbox indexes",
													ALLOCSET_SMALL_SIZES);
	MemoryContextReset(index_cache_context);
	n_outbox_indexes = 0;

	indexes = ok ? RelationGetIndexList(rel) : NIL;
	if (list_length(indexes) > INDEX_MAX_KEYS)
		ok = false;
	foreach(lc, indexes)
	{
		Relation	idx;
		MemoryContext old;

		if (!ok)
			break;
		idx = index_open(lfirst_oid(lc), AccessShareLock);
		if (!heap_attisnull(idx->rd_indextuple, Anum_pg_index_indexprs, NULL) ||
			!heap_attisnull(idx->rd_indextuple, Anum_pg_index_indpred, NULL) ||
			idx->rd_index->indisexclusion || !idx->rd_index->indimmediate)
			ok = false;
		else
		{
			/* kept, so a row's insert need not build it again */
			old = MemoryContextSwitchTo(index_cache_context);
			outbox_index_infos[n_outbox_indexes] = BuildIndexInfo(idx);
			MemoryContextSwitchTo(old);
			outbox_index_oids[n_outbox_indexes] = RelationGetRelid(idx);
			outbox_index_unique[n_outbox_indexes] = idx->rd_index->indisunique;
			n_outbox_indexes++;
		}
		index_close(idx, AccessShareLock);
	}
	table_close(rel, AccessShareLock);
	return ok;
}

/*
 * The six values a caller gives for a new outbox row, in the order of
 * outbox_columns: id, pixel_id, event_id, conversion_id, conversion_time,
 * payload (json is text inside: built valid, stored without a re-parse).
 */
#define NUM_GIVEN_COLUMNS 6

static void
given_values(Datum *values, int64 id, const char *pixel,
			 const char *event_id, const char *conversion_id,
			 TimestampTz conversion_time, const char *payload)
{
	values[0] = Int64GetDatum(id);
	values[1] = CStringGetTextDatum(pixel);
	values[2] = CStringGetTextDatum(event_id);
	values[3] = CStringGetTextDatum(conversion_id);
	values[4] = TimestampTzGetDatum(conversion_time);
	values[5] = CStringGetTextDatum(payload);
}

/*
 * Form the queued row and insert it into the heap and every index, as the
 * executor would for this table (see can_insert_directly).
 */
static void
insert_directly(int64 id, const char *pixel, const char *event_id,
				const char *conversion_id, TimestampTz conversion_time,
				const char *payload)
{
	Relation	rel = table_open(table_oid, RowExclusiveLock);
	TupleDesc	desc = RelationGetDescr(rel);
	Datum	   *values = palloc0(sizeof(Datum) * desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * desc->natts);
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	Datum		given[NUM_OUTBOX_COLUMNS];
	bool		given_null[NUM_OUTBOX_COLUMNS] = {0};
	HeapTuple	tup;

	given_values(given, id, pixel, event_id, conversion_id, conversion_time,
				 payload);
	given[6] = CStringGetTextDatum("queued");
	given[7] = Int32GetDatum(0);
	given[8] = TimestampTzGetDatum(now);	/* the column defaults: now() */
	given_null[9] = given_null[10] = given_null[11] = true;
	given[12] = TimestampTzGetDatum(now);
	given_null[13] = true;

	memset(nulls, true, sizeof(bool) * desc->natts);
	for (int i = 0; i < (int) NUM_OUTBOX_COLUMNS; i++)
	{
		values[outbox_attnums[i] - 1] = given[i];
		nulls[outbox_attnums[i] - 1] = given_null[i];
	}
	tup = heap_form_tuple(desc, values, nulls);
	simple_heap_insert(rel, tup);

	for (int i = 0; i < n_outbox_indexes; i++)
	{
		IndexInfo  *info = outbox_index_infos[i];
		Relation	idx = index_open(outbox_index_oids[i], RowExclusiveLock);
		Datum		ivalues[INDEX_MAX_KEYS];
		bool		inulls[INDEX_MAX_KEYS];

		for (int k = 0; k < info->ii_NumIndexAttrs; k++)
		{
			AttrNumber	attnum = info->ii_IndexAttrNumbers[k];

			ivalues[k] = values[attnum - 1];
			inulls[k] = nulls[attnum - 1];
		}
		index_insert(idx, ivalues, inulls, &tup->t_self, rel,
					 outbox_index_unique[i] ? UNIQUE_CHECK_YES : UNIQUE_CHECK_NO,
					 false, info);
		/* the lock is kept to the end of the transaction, as the executor does */
		index_close(idx, NoLock);
	}
	heap_freetuple(tup);
	table_close(rel, NoLock);
}

/*
 * Any change to the outbox table (DDL, a new trigger or index, DROP
 * EXTENSION) or to a schema invalidates what was looked up.
 */
static void
outbox_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == table_oid)
		lookup_valid = false;
}

static void
outbox_syscache_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	lookup_valid = false;
}

/*
 * Find the extension's schema, table owner and id sequence, and whether
 * rows can be inserted directly.  Kept until an invalidation message says
 * the table or a schema changed: a busy backend or the worker does not pay
 * for catalog lookups on every transaction.  Returns false if the
 * extension is not installed in this database.  When the schema changed
 * (the extension was re-created elsewhere), the kept plans are dropped.
 */
bool
xcapi_outbox_lookup_schema(void)
{
	Oid			ext;
	Oid			nsp;
	Oid			table;
	HeapTuple	tup;

	if (lookup_valid)
		return true;
	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(outbox_relcache_callback, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACEOID, outbox_syscache_callback,
									  (Datum) 0);
		callbacks_registered = true;
	}

	ext = get_extension_oid("xcapi", true);
	if (!OidIsValid(ext))
		return false;
	nsp = extension_schema(ext);
	if (!OidIsValid(nsp))
		return false;
	table = get_relname_relid("xcapi_conversions", nsp);
	sequence_oid = get_relname_relid("xcapi_conversions_id_seq", nsp);
	if (!OidIsValid(table) || !OidIsValid(sequence_oid))
		return false;

	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(table));
	if (!HeapTupleIsValid(tup))
		return false;
	table_owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	table_oid = table;
	direct_insert = can_insert_directly(table);

	if (nsp != schema_oid)
	{
		for (int i = 0; i < NUM_PLANS; i++)
		{
			if (plans[i])
				SPI_freeplan(plans[i]);
			plans[i] = NULL;
		}
		if (schema_name)
			pfree(schema_name);
		schema_name = MemoryContextStrdup(TopMemoryContext,
										  quote_identifier(get_namespace_name(nsp)));
		schema_oid = nsp;
	}
	lookup_valid = true;
	return true;
}

const char *
xcapi_outbox_schema(void)
{
	return schema_name;
}

/* The schema's name unquoted, for catalog lookups. */
const char *
xcapi_outbox_schema_raw(void)
{
	return get_namespace_name(schema_oid);
}

/*
 * The kept plan for one statement; "%s" in sql stands for the schema.
 * Must be called inside SPI.
 */
static SPIPlanPtr
get_plan(OutboxPlan which, const char *sql, int nargs, Oid *argtypes)
{
	if (plans[which] == NULL)
	{
		char	   *query = psprintf(sql, schema_name, schema_name);
		SPIPlanPtr	plan = SPI_prepare(query, nargs, argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 query, SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		plans[which] = plan;
		pfree(query);
	}
	return plans[which];
}

static ArrayType *
int8_array(int64 *ids, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(ids[i]);
	return construct_array(d, n, INT8OID, sizeof(int64), FLOAT8PASSBYVAL,
						   TYPALIGN_DOUBLE);
}

/* Run a kept plan that modifies rows; check it worked. */
static uint64
run_plan(SPIPlanPtr plan, Datum *values, const char *nulls, int expect)
{
	int			rc = SPI_execute_plan(plan, values, nulls, false, 0);

	if (rc != expect)
		elog(ERROR, "outbox statement failed: %s", SPI_result_code_string(rc));
	return SPI_processed;
}

/*
 * Next value of the id sequence, as the table owner (the caller may have
 * EXECUTE on xcapi_fire and no right on the sequence).
 */
int64
xcapi_outbox_next_id(void)
{
	return nextval_internal(sequence_oid, false);
}

/*
 * Insert one queued conversion, directly or through SPI as the table's
 * owner; either way a role granted only EXECUTE on xcapi_fire can enqueue
 * without reading the queue.  payload is the conversion object's JSON
 * text, stored as it is.
 */
void
xcapi_outbox_insert(int64 id, const char *pixel, const char *event_id,
					const char *conversion_id, TimestampTz conversion_time,
					const char *payload)
{
	Oid			save_userid;
	int			save_sec_context;

	if (direct_insert)
	{
		insert_directly(id, pixel, event_id, conversion_id, conversion_time,
						payload);
		return;
	}

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(table_owner,
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	PG_TRY();
	{
		Oid			types[NUM_GIVEN_COLUMNS] = {INT8OID, TEXTOID, TEXTOID,
		TEXTOID, TIMESTAMPTZOID, JSONOID};
		Datum		values[NUM_GIVEN_COLUMNS];
		SPIPlanPtr	plan;

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		plan = get_plan(PLAN_INSERT,
						"INSERT INTO %s.xcapi_conversions "
						"(id, pixel_id, event_id, conversion_id, conversion_time, payload) "
						"VALUES ($1, $2, $3, $4, $5, $6)", NUM_GIVEN_COLUMNS, types);
		given_values(values, id, pixel, event_id, conversion_id,
					 conversion_time, payload);
		run_plan(plan, values, NULL, SPI_OK_INSERT);
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec_context);
	}
	PG_END_TRY();
}

/*
 * Start-up repair.  Rows left 'sending' (by a 0.1.0 worker) are queued
 * again.  Rows held back by a previous worker (a paused pixel, missing or
 * rejected credentials, a rate limit: recognisable by having no HTTP
 * status or 401, 403 or 429) are due at once: this worker knows nothing of
 * those pauses, and it may be running after a promotion or a restart with
 * new credentials.  Rows waiting out a backoff after a 5xx keep their time.
 */
int
xcapi_outbox_repair(void)
{
	char	   *sql;
	int			rc;
	int			n;

	SPI_connect();
	sql = psprintf("UPDATE %s.xcapi_conversions SET status = 'queued', "
				   "next_attempt_at = now() WHERE status = 'sending'",
				   schema_name);
	rc = SPI_execute(sql, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not repair outbox: %s", SPI_result_code_string(rc));
	n = (int) SPI_processed;

	sql = psprintf("UPDATE %s.xcapi_conversions SET next_attempt_at = now()"
				   " WHERE next_attempt_at > now() AND status = 'queued'"
				   " AND (last_http_status IS NULL"
				   " OR last_http_status IN (401, 403, 429))",
				   schema_name);
	rc = SPI_execute(sql, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not release held conversions: %s",
			 SPI_result_code_string(rc));
	SPI_finish();
	return n;
}

/*
 * Read up to limit due conversions of pixels not in paused_pixels, oldest
 * due first.  Rows are copied into the caller's memory context.  Returns
 * how many were read.
 */
int
xcapi_outbox_claim(int limit, ArrayType *paused_pixels, XcapiClaimed **rows)
{
	MemoryContext caller = CurrentMemoryContext;
	Oid			types[2] = {INT4OID, TEXTARRAYOID};
	Datum		values[2];
	SPIPlanPtr	plan;
	int			n;

	SPI_connect();
	plan = get_plan(PLAN_CLAIM,
					"SELECT id, pixel_id, payload::text, attempts"
					" FROM %s.xcapi_conversions"
					" WHERE next_attempt_at <= now() AND status = 'queued'"
					" AND pixel_id <> ALL ($2)"
					" ORDER BY next_attempt_at, id LIMIT $1",
					2, types);
	values[0] = Int32GetDatum(limit);
	values[1] = PointerGetDatum(paused_pixels);
	/* not read-only: it must see this transaction's own updates */
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read due conversions");

	n = (int) SPI_processed;
	*rows = MemoryContextAlloc(caller, sizeof(XcapiClaimed) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		XcapiClaimed *row = &(*rows)[i];

		row->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		row->pixel_id = MemoryContextStrdup(caller,
											TextDatumGetCString(SPI_getbinval(tup, desc, 2, &isnull)));
		row->payload = MemoryContextStrdup(caller,
										   TextDatumGetCString(SPI_getbinval(tup, desc, 3, &isnull)));
		row->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
	}
	SPI_finish();
	return n;
}

/*
 * When the earliest queued conversion of an unpaused pixel becomes due, if
 * before "before"; DT_NOEND otherwise.  The bound keeps the index scan
 * short: rows deferred to the end of a pause lie beyond it.
 */
TimestampTz
xcapi_outbox_next_due(ArrayType *paused_pixels, TimestampTz before)
{
	Oid			types[2] = {TEXTARRAYOID, TIMESTAMPTZOID};
	Datum		values[2] = {PointerGetDatum(paused_pixels),
	TimestampTzGetDatum(before)};
	SPIPlanPtr	plan;
	TimestampTz result = DT_NOEND;
	bool		isnull;
	Datum		d;

	SPI_connect();
	plan = get_plan(PLAN_NEXT_DUE,
					"SELECT next_attempt_at FROM %s.xcapi_conversions"
					" WHERE next_attempt_at < $2 AND status = 'queued'"
					" AND pixel_id <> ALL ($1)"
					" ORDER BY next_attempt_at LIMIT 1",
					2, types);
	if (SPI_execute_plan(plan, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the outbox");
	if (SPI_processed > 0)
	{
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
						  &isnull);
		if (!isnull)
			result = DatumGetTimestampTz(d);
	}
	SPI_finish();
	return result;
}

void
xcapi_outbox_mark_sent(int64 *ids, int n, int http_status)
{
	Oid			types[2] = {INT8ARRAYOID, INT4OID};
	Datum		values[2];

	SPI_connect();
	values[0] = PointerGetDatum(int8_array(ids, n));
	values[1] = Int32GetDatum(http_status);
	run_plan(get_plan(PLAN_SENT,
					  "UPDATE %s.xcapi_conversions"
					  " SET status = 'sent', sent_at = now(), next_attempt_at = NULL,"
					  " attempts = attempts + 1, last_attempt_at = now(),"
					  " last_http_status = $2, last_error = NULL"
					  " WHERE id = ANY ($1) AND status IN ('queued', 'sending')",
					  2, types),
			 values, NULL, SPI_OK_UPDATE);
	SPI_finish();
}

/*
 * Back to the queue, due at next_attempt.  A counted attempt that was the
 * last one allowed makes the row dead instead; an attempt not counted (a
 * rate limit, a paused credential) leaves the count alone.
 */
void
xcapi_outbox_mark_retry(int64 *ids, int n, int http_status,
						const char *error, TimestampTz next_attempt,
						bool count_attempt)
{
	Oid			types[6] = {INT8ARRAYOID, INT4OID, TEXTOID, TIMESTAMPTZOID,
	BOOLOID, INT4OID};
	Datum		values[6];
	char		nulls[6] = "      ";

	SPI_connect();
	values[0] = PointerGetDatum(int8_array(ids, n));
	values[1] = Int32GetDatum(http_status);
	if (http_status == 0)
		nulls[1] = 'n';
	values[2] = CStringGetTextDatum(error);
	values[3] = TimestampTzGetDatum(next_attempt);
	values[4] = BoolGetDatum(count_attempt);
	values[5] = Int32GetDatum(xcapi_max_attempts);
	run_plan(get_plan(PLAN_RETRY,
					  "UPDATE %s.xcapi_conversions"
					  " SET status = CASE WHEN $5 AND attempts + 1 >= $6"
					  "   THEN 'dead' ELSE 'queued' END,"
					  " attempts = attempts + CASE WHEN $5 THEN 1 ELSE 0 END,"
					  " next_attempt_at = CASE WHEN $5 AND attempts + 1 >= $6"
					  "   THEN NULL ELSE $4 END,"
					  " last_attempt_at = now(),"
					  " last_http_status = $2, last_error = $3"
					  " WHERE id = ANY ($1) AND status IN ('queued', 'sending')",
					  6, types),
			 values, nulls, SPI_OK_UPDATE);
	SPI_finish();
}

/* Rejected for good: X said this conversion itself is wrong. */
void
xcapi_outbox_mark_dead(int64 *ids, int n, int http_status, const char *error)
{
	Oid			types[3] = {INT8ARRAYOID, INT4OID, TEXTOID};
	Datum		values[3];

	SPI_connect();
	values[0] = PointerGetDatum(int8_array(ids, n));
	values[1] = Int32GetDatum(http_status);
	values[2] = CStringGetTextDatum(error);
	run_plan(get_plan(PLAN_DEAD,
					  "UPDATE %s.xcapi_conversions"
					  " SET status = 'dead', next_attempt_at = NULL,"
					  " attempts = attempts + 1, last_attempt_at = now(),"
					  " last_http_status = $2, last_error = $3"
					  " WHERE id = ANY ($1) AND status IN ('queued', 'sending')",
					  3, types),
			 values, NULL, SPI_OK_UPDATE);
	SPI_finish();
}

/*
 * After new credentials are loaded, rows held back for missing or rejected
 * credentials (by this worker for the given pixels, or by an earlier one,
 * going by their last answer) are due at once.
 */
void
xcapi_outbox_release_auth_pauses(ArrayType *pixels)
{
	char	   *sql;
	Oid			types[1] = {TEXTARRAYOID};
	Datum		values[1] = {PointerGetDatum(pixels)};

	SPI_connect();
	sql = psprintf("UPDATE %s.xcapi_conversions SET next_attempt_at = now()"
				   " WHERE next_attempt_at > now() AND status = 'queued'"
				   " AND (pixel_id = ANY ($1) OR last_http_status IN (401, 403)"
				   " OR last_error LIKE 'no usable credentials%%')",
				   schema_name);
	if (SPI_execute_with_args(sql, 1, types, values, NULL, false, 0) !=
		SPI_OK_UPDATE)
		elog(ERROR, "could not release paused conversions");
	SPI_finish();
}

/*
 * Make the due rows of paused pixels due at the end of their pause
 * instead (attempts untouched), saying why in last_error, so that claims
 * stop walking over them.
 * At most DEFER_BATCH rows per call, taken in the due index's order like
 * a claim (other shapes got a sequential or bitmap scan in the generic
 * plan); a larger backlog is moved over the next calls.
 */
#define DEFER_BATCH 10000

void
xcapi_outbox_defer(ArrayType *pixels, ArrayType *untils, ArrayType *reasons)
{
	Oid			types[4] = {TEXTARRAYOID, TIMESTAMPTZARRAYOID, INT4OID,
	TEXTARRAYOID};
	Datum		values[4] = {PointerGetDatum(pixels), PointerGetDatum(untils),
		Int32GetDatum(DEFER_BATCH), PointerGetDatum(reasons)};

	SPI_connect();
	run_plan(get_plan(PLAN_DEFER,
					  "UPDATE %s.xcapi_conversions c SET next_attempt_at = u.until,"
					  " last_error = 'held back while the pixel is paused: ' || u.reason"
					  " FROM (SELECT id, pixel_id FROM %s.xcapi_conversions"
					  " WHERE next_attempt_at <= now() AND status = 'queued'"
					  " AND pixel_id = ANY ($1)"
					  " ORDER BY next_attempt_at, id LIMIT $3) d,"
					  " unnest($1, $2, $4) AS u (pixel, until, reason)"
					  " WHERE c.id = d.id AND u.pixel = d.pixel_id",
					  4, types),
			 values, NULL, SPI_OK_UPDATE);
	SPI_finish();
}

/*
 * Delete up to limit sent conversions older than the retention, oldest
 * first, in one short statement so no lock is held for long.  Returns how
 * many went.
 */
int
xcapi_outbox_purge(int retention_secs, int limit)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2];
	int			n;

	SPI_connect();
	values[0] = Int32GetDatum(retention_secs);
	values[1] = Int32GetDatum(limit);
	run_plan(get_plan(PLAN_PURGE,
					  "DELETE FROM %s.xcapi_conversions WHERE id IN ("
					  " SELECT id FROM %s.xcapi_conversions"
					  " WHERE status = 'sent'"
					  " AND sent_at < now() - make_interval(secs => $1)"
					  " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
					  2, types),
			 values, NULL, SPI_OK_DELETE);
	n = (int) SPI_processed;
	SPI_finish();
	return n;
}

/*
 * True if some conversion is queued or sending, as of a fresh snapshot.
 */
static bool
outbox_has_pending(void)
{
	SPIPlanPtr	plan;
	bool		pending;

	SPI_connect();
	plan = get_plan(PLAN_PENDING,
					"SELECT 1 FROM %s.xcapi_conversions"
					" WHERE next_attempt_at IS NOT NULL"
					" AND status IN ('queued', 'sending') LIMIT 1",
					0, NULL);
	/* read_only = false: a new snapshot each time under READ COMMITTED */
	if (SPI_execute_plan(plan, NULL, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the outbox");
	pending = SPI_processed > 0;
	SPI_finish();
	return pending;
}

/*
 * xcapi_wait(timeout): wait until nothing is queued or sending (true) or
 * the timeout passes (false).  Polls with a growing interval up to 100 ms;
 * it needs a new snapshot each time, hence READ COMMITTED, and cannot
 * wait for conversions its own transaction has not committed.
 */
Datum
xcapi_wait(PG_FUNCTION_ARGS)
{
	Interval   *timeout = PG_GETARG_INTERVAL_P(0);
	TimestampTz deadline;
	long		sleep_ms = 1;

	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("xcapi_wait cannot run in a REPEATABLE READ or SERIALIZABLE transaction"),
				 errhint("Call it in its own READ COMMITTED transaction.")));
	if (xcapi_fired_in_this_transaction())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("xcapi_wait cannot wait for conversions queued in the same transaction"),
				 errdetail("They are sent only after the transaction commits."),
				 errhint("Commit first, then call xcapi_wait.")));
	if (!xcapi_outbox_lookup_schema())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"xcapi\" is not installed in this database")));

	deadline = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													   TimestampTzGetDatum(GetCurrentTimestamp()),
													   IntervalPGetDatum(timeout)));
	for (;;)
	{
		TimestampTz now;

		if (!outbox_has_pending())
			PG_RETURN_BOOL(true);
		now = GetCurrentTimestamp();
		if (now >= deadline)
			PG_RETURN_BOOL(false);

		sleep_ms = Min(sleep_ms * 2, 100);
		sleep_ms = Min(sleep_ms,
					   TimestampDifferenceMilliseconds(now, deadline) + 1);
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * xcapi_retry(ids, pixel, error_like): dead conversions back in the queue,
 * due at once with a fresh attempt budget.  NULL arguments do not filter.
 * Their last error stays until the next attempt replaces it.
 */
Datum
xcapi_retry(PG_FUNCTION_ARGS)
{
	Oid			types[3] = {INT8ARRAYOID, TEXTOID, TEXTOID};
	Datum		values[3];
	char		nulls[3] = "   ";
	char	   *sql;
	uint64		n;

	if (!xcapi_outbox_lookup_schema())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"xcapi\" is not installed in this database")));
	for (int i = 0; i < 3; i++)
	{
		if (PG_ARGISNULL(i))
		{
			nulls[i] = 'n';
			values[i] = (Datum) 0;
		}
		else
			values[i] = PG_GETARG_DATUM(i);
	}

	SPI_connect();
	sql = psprintf("UPDATE %s.xcapi_conversions"
				   " SET status = 'queued', attempts = 0, next_attempt_at = now()"
				   " WHERE status = 'dead'"
				   " AND ($1 IS NULL OR id = ANY ($1))"
				   " AND ($2 IS NULL OR pixel_id = $2)"
				   " AND ($3 IS NULL OR last_error LIKE $3)",
				   schema_name);
	if (SPI_execute_with_args(sql, 3, types, values, nulls, false, 0) !=
		SPI_OK_UPDATE)
		elog(ERROR, "could not re-queue dead conversions");
	n = SPI_processed;
	SPI_finish();

	if (n > 0)
		xcapi_wake_worker_at_commit();
	PG_RETURN_INT64((int64) n);
}
