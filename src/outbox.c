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
 * 'sent' or 'dead' and never vanishes: no status change marks a claim.
 * A resend carries the same stored payload, hence the same conversion_id,
 * which is what X deduplicates on.  ('sending' is what workers of version
 * 0.1.0 wrote; rows in it are repaired at start and accepted by every
 * outcome.)
 *
 * New rows go to xcapi_conversions_intake (from version 0.3.0), a child of
 * xcapi_conversions by inheritance with no index: a query on the outbox
 * sees them at once, and the inserting transaction pays for a heap tuple
 * only.  The worker files them into xcapi_conversions itself, where the
 * primary key and the due index are (see xcapi_outbox_file_intake); its
 * other statements therefore name ONLY xcapi_conversions.  A row is thus
 * written three times in its life: into the intake by the caller, into the
 * outbox by the worker's filing (after the commit, in chunks), and with
 * its outcome.
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
#include "access/heaptoast.h"
#include "access/tupconvert.h"
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
#include "executor/executor.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
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
	PLAN_FILE_INTAKE,
	NUM_PLANS
} OutboxPlan;

static char *schema_name = NULL;	/* quoted, in TopMemoryContext */
static Oid	schema_oid = InvalidOid;
static Oid	table_oid = InvalidOid;
static Oid	intake_oid = InvalidOid;	/* xcapi_conversions_intake, 0.3.0 on */
static Oid	insert_oid = InvalidOid;	/* where new rows go: the intake */
static Oid	table_owner = InvalidOid;
static Oid	sequence_oid = InvalidOid;
static bool direct_insert = false;	/* see can_insert_directly() */
static bool lookup_valid = false;	/* until an invalidation says otherwise */
static bool callbacks_registered = false;
static SPIPlanPtr plans[NUM_PLANS];

/* Most rows written by one heap_multi_insert (see PendingRow). */
#define PENDING_MAX 1000

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

/*
 * CHECK constraints xcapi creates on the outbox (and the intake inherits):
 * status and next_attempt_at.  Rows written without the executor satisfy
 * them by construction; a table with more has one someone added, which
 * only the executor would enforce.
 */
#define XCAPI_CHECK_CONSTRAINTS 2

/*
 * A table xcapi writes rows into without the executor, as looked up with
 * the table (see can_insert_directly): its columns and its indexes.
 */
typedef struct DirectTable
{
	MemoryContext context;		/* the IndexInfos */
	AttrNumber	attnums[NUM_OUTBOX_COLUMNS];	/* of outbox_columns */
	int			nindexes;
	Oid			index_oids[INDEX_MAX_KEYS];
	IndexInfo  *index_infos[INDEX_MAX_KEYS];
	bool		index_unique[INDEX_MAX_KEYS];
} DirectTable;

static DirectTable insert_target;	/* where new rows go: the intake */
static DirectTable filing_target;	/* where the worker files them */
static bool direct_filing = false;	/* can_insert_directly(filing_target) */

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
can_insert_directly(Oid table, DirectTable *target)
{
	Relation	rel = table_open(table, AccessShareLock);
	TupleDesc	desc = RelationGetDescr(rel);
	bool		ok = rel->rd_rel->relkind == RELKIND_RELATION &&
		rel->trigdesc == NULL && !rel->rd_rel->relhasrules &&
		!rel->rd_rel->relrowsecurity &&
		rel->rd_rel->relchecks <= XCAPI_CHECK_CONSTRAINTS;
	List	   *indexes;
	ListCell   *lc;
	int			live = 0;

	for (int i = 0; ok && i < (int) NUM_OUTBOX_COLUMNS; i++)
	{
		target->attnums[i] = get_attnum(table, outbox_columns[i]);
		ok = target->attnums[i] != InvalidAttrNumber;
	}
	for (int i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped)
			live++;
	ok = ok && live == (int) NUM_OUTBOX_COLUMNS;

	if (target->context == NULL)
		target->context = AllocSetContextCreate(TopMemoryContext,
												"xcapi outbox indexes",
												ALLOCSET_SMALL_SIZES);
	MemoryContextReset(target->context);
	target->nindexes = 0;

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
			old = MemoryContextSwitchTo(target->context);
			target->index_infos[target->nindexes] = BuildIndexInfo(idx);
			MemoryContextSwitchTo(old);
			target->index_oids[target->nindexes] = RelationGetRelid(idx);
			target->index_unique[target->nindexes] = idx->rd_index->indisunique;
			target->nindexes++;
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
given_values(Datum *values, const XcapiQueuedRow *row)
{
	values[0] = Int64GetDatum(row->id);
	values[1] = CStringGetTextDatum(row->pixel);
	values[2] = CStringGetTextDatum(row->event_id);
	values[3] = CStringGetTextDatum(row->conversion_id);
	values[4] = TimestampTzGetDatum(row->conversion_time);
	values[5] = CStringGetTextDatum(row->payload);
}

/*
 * The queued row's values in the table's column order, as the executor
 * would make them for this table (see can_insert_directly): the six given
 * values (see given_values) and the columns' defaults.  values and nulls
 * have desc->natts entries.
 */
static void
queued_row_values(TupleDesc desc, const Datum *given_datums, Datum *values,
				  bool *nulls)
{
	static Datum queued_status = (Datum) 0; /* 'queued', made once */
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	Datum		given[NUM_OUTBOX_COLUMNS];
	bool		given_null[NUM_OUTBOX_COLUMNS] = {0};

	if (queued_status == (Datum) 0)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		queued_status = CStringGetTextDatum("queued");
		MemoryContextSwitchTo(old);
	}
	memcpy(given, given_datums, sizeof(Datum) * NUM_GIVEN_COLUMNS);
	given[6] = queued_status;
	given[7] = Int32GetDatum(0);
	given[8] = TimestampTzGetDatum(now);	/* the column defaults: now() */
	given_null[9] = given_null[10] = given_null[11] = true;
	given[12] = TimestampTzGetDatum(now);
	given_null[13] = true;

	memset(values, 0, sizeof(Datum) * desc->natts);
	memset(nulls, true, sizeof(bool) * desc->natts);
	for (int i = 0; i < (int) NUM_OUTBOX_COLUMNS; i++)
	{
		values[insert_target.attnums[i] - 1] = given[i];
		nulls[insert_target.attnums[i] - 1] = given_null[i];
	}
}

/*
 * Lock xcapi_conversions before its intake, as everything that reaches the
 * intake through its parent does (TRUNCATE, DELETE, a query): taking the
 * two in the other order could deadlock with them.  The lock is the one an
 * insert into xcapi_conversions took before there was an intake.
 */
static void
lock_outbox_first(void)
{
	if (insert_oid != table_oid)
		LockRelationOid(table_oid, RowExclusiveLock);
}

/*
 * Lowest block of the intake this transaction wrote to, published at
 * commit so that the worker knows where to look (see
 * xcapi_outbox_file_intake).
 */
static BlockNumber intake_low_this_xact = InvalidBlockNumber;

static void
note_intake_block(BlockNumber blk)
{
	if (insert_oid != table_oid && blk < intake_low_this_xact)
		intake_low_this_xact = blk;
}

/* At commit: lower the shared hint to this transaction's lowest block. */
static void
publish_intake_block(void)
{
	uint32		seen;

	if (intake_low_this_xact == InvalidBlockNumber || xcapi_shared == NULL)
		return;
	seen = pg_atomic_read_u32(&xcapi_shared->intake_low_block);
	while (intake_low_this_xact < seen &&
		   !pg_atomic_compare_exchange_u32(&xcapi_shared->intake_low_block,
										   &seen, intake_low_this_xact))
		;
}

/* The table new rows go to (the intake), locked for inserting. */
static Relation
open_for_insert(void)
{
	lock_outbox_first();
	return table_open(insert_oid, RowExclusiveLock);
}

/* Open a table's indexes for inserting; the locks last to commit. */
static Relation *
open_outbox_indexes(const DirectTable *t)
{
	Relation   *idx = palloc(sizeof(Relation) * Max(t->nindexes, 1));

	for (int i = 0; i < t->nindexes; i++)
		idx[i] = index_open(t->index_oids[i], RowExclusiveLock);
	return idx;
}

static void
close_outbox_indexes(const DirectTable *t, Relation *idx)
{
	/* the locks are kept to the end of the transaction, as the executor does */
	for (int i = 0; i < t->nindexes; i++)
		index_close(idx[i], NoLock);
	pfree(idx);
}

/* The index entries of one heap tuple at tid, in every index of t. */
static void
insert_index_entries(const DirectTable *t, Relation rel, Relation *idx,
					 Datum *values, bool *nulls, ItemPointer tid)
{
	for (int i = 0; i < t->nindexes; i++)
	{
		IndexInfo  *info = t->index_infos[i];
		Datum		ivalues[INDEX_MAX_KEYS];
		bool		inulls[INDEX_MAX_KEYS];

		for (int k = 0; k < info->ii_NumIndexAttrs; k++)
		{
			AttrNumber	attnum = info->ii_IndexAttrNumbers[k];

			ivalues[k] = values[attnum - 1];
			inulls[k] = nulls[attnum - 1];
		}
		index_insert(idx[i], ivalues, inulls, tid, rel,
					 t->index_unique[i] ? UNIQUE_CHECK_YES : UNIQUE_CHECK_NO,
					 false, info);
	}
}

/* Insert one queued row (given: see given_values) into the heap and indexes. */
static void
insert_directly(const Datum *given)
{
	Relation	rel = open_for_insert();
	TupleDesc	desc = RelationGetDescr(rel);
	Datum	   *values = palloc(sizeof(Datum) * desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * desc->natts);
	Relation   *idx;
	HeapTuple	tup;

	queued_row_values(desc, given, values, nulls);
	tup = heap_form_tuple(desc, values, nulls);
	simple_heap_insert(rel, tup);
	note_intake_block(ItemPointerGetBlockNumber(&tup->t_self));
	idx = open_outbox_indexes(&insert_target);
	insert_index_entries(&insert_target, rel, idx, values, nulls, &tup->t_self);
	close_outbox_indexes(&insert_target, idx);
	heap_freetuple(tup);
	table_close(rel, NoLock);
}

/*
 * n heap tuple slots for rows of desc, kept from one flush to the next:
 * making and dropping a slot per row costs more than the multi-insert
 * saves.  They use a copy of the descriptor, so they pin nothing and can
 * outlive the transaction; the tuples they hold belong to the caller's
 * memory context and are cleared after each use.
 */
#define SLOTS_KEPT 64			/* kept across transactions */

static MemoryContext slots_context = NULL;
static TupleDesc slots_desc = NULL;
static TupleTableSlot **kept_slots = NULL;
static int	n_slots = 0;

static TupleTableSlot **
flush_slots(TupleDesc desc, int n)
{
	MemoryContext old;

	if (slots_context != NULL && !equalTupleDescs(slots_desc, desc))
	{
		MemoryContextDelete(slots_context);
		slots_context = NULL;
	}
	if (slots_context == NULL)
	{
		slots_context = AllocSetContextCreate(TopMemoryContext,
											  "xcapi flush slots",
											  ALLOCSET_DEFAULT_SIZES);
		old = MemoryContextSwitchTo(slots_context);
		slots_desc = CreateTupleDescCopyConstr(desc);
		kept_slots = palloc(sizeof(TupleTableSlot *) * PENDING_MAX);
		n_slots = 0;
		MemoryContextSwitchTo(old);
	}
	Assert(n <= PENDING_MAX);
	old = MemoryContextSwitchTo(slots_context);
	while (n_slots < n)
		kept_slots[n_slots++] = MakeSingleTupleTableSlot(slots_desc,
														 &TTSOpsHeapTuple);
	MemoryContextSwitchTo(old);
	return kept_slots;
}

/*
 * Insert many queued rows: the heap in one heap_multi_insert (one WAL
 * record per page rather than per row, each page locked once), then the
 * index entries row by row, as COPY does.  Allocates in the caller's
 * (short-lived) memory context.
 */
static void
insert_many_directly(Datum **given, int n)
{
	Relation	rel = open_for_insert();
	TupleDesc	desc = RelationGetDescr(rel);
	TupleTableSlot **slots = flush_slots(desc, n);
	int			natts = desc->natts;

	/* one allocation each for all rows' values and nulls */
	Datum	   *values = palloc(sizeof(Datum) * natts * n);
	bool	   *nulls = palloc(sizeof(bool) * natts * n);
	Relation   *idx;

	for (int i = 0; i < n; i++)
	{
		queued_row_values(desc, given[i], &values[i * natts], &nulls[i * natts]);
		ExecStoreHeapTuple(heap_form_tuple(desc, &values[i * natts],
										   &nulls[i * natts]),
						   slots[i], false);
	}
	heap_multi_insert(rel, slots, n, GetCurrentCommandId(true), 0, NULL);
	for (int i = 0; i < n; i++)
		note_intake_block(ItemPointerGetBlockNumber(&slots[i]->tts_tid));
	idx = open_outbox_indexes(&insert_target);
	for (int i = 0; i < n && insert_target.nindexes > 0; i++)
		insert_index_entries(&insert_target, rel, idx, &values[i * natts],
							 &nulls[i * natts], &slots[i]->tts_tid);
	close_outbox_indexes(&insert_target, idx);
	for (int i = 0; i < n; i++)
		ExecClearTuple(slots[i]);
	table_close(rel, NoLock);
}

/*
 * Any change to the outbox table (DDL, a new trigger or index, DROP
 * EXTENSION) or to a schema invalidates what was looked up.
 */
static void
outbox_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == table_oid || relid == intake_oid)
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
	/* before ALTER EXTENSION ... UPDATE to 0.3.0 there is no intake */
	intake_oid = get_relname_relid("xcapi_conversions_intake", nsp);

	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(table));
	if (!HeapTupleIsValid(tup))
		return false;
	table_owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	table_oid = table;
	if (insert_oid != (OidIsValid(intake_oid) ? intake_oid : table) &&
		plans[PLAN_INSERT] != NULL)
	{
		SPI_freeplan(plans[PLAN_INSERT]);
		plans[PLAN_INSERT] = NULL;
	}
	insert_oid = OidIsValid(intake_oid) ? intake_oid : table;
	direct_insert = can_insert_directly(insert_oid, &insert_target);
	/* both as created: nothing of someone else's to fire or check */
	direct_filing = OidIsValid(intake_oid) && direct_insert &&
		can_insert_directly(table_oid, &filing_target);

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
 * Insert one queued conversion through SPI as the table's owner: the way
 * that honours whatever was added to the table (see can_insert_directly).
 */
static void
insert_through_spi(const Datum *given)
{
	Oid			save_userid;
	int			save_sec_context;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(table_owner,
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	PG_TRY();
	{
		Oid			types[NUM_GIVEN_COLUMNS] = {INT8OID, TEXTOID, TEXTOID,
		TEXTOID, TIMESTAMPTZOID, JSONOID};
		SPIPlanPtr	plan;

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		lock_outbox_first();
		note_intake_block(0);	/* where the executor put it is not known */
		plan = get_plan(PLAN_INSERT,
						OidIsValid(intake_oid) ?
						"INSERT INTO %s.xcapi_conversions_intake "
						"(id, pixel_id, event_id, conversion_id, conversion_time, payload) "
						"VALUES ($1, $2, $3, $4, $5, $6)" :
						"INSERT INTO %s.xcapi_conversions "
						"(id, pixel_id, event_id, conversion_id, conversion_time, payload) "
						"VALUES ($1, $2, $3, $4, $5, $6)", NUM_GIVEN_COLUMNS, types);
		run_plan(plan, (Datum *) given, NULL, SPI_OK_INSERT);
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec_context);
	}
	PG_END_TRY();
}

/*
 * Rows fired by AFTER ROW triggers wait here until their statement's
 * ExecutorFinish returns (that is where such triggers run), and are then
 * written together: a 100,000-row INSERT ... SELECT then costs its
 * conversions one multi-insert per PENDING_MAX rows instead of a heap
 * insert, a WAL record and a relation open apiece.  Nothing is visible
 * later than before: rows inserted by a statement are invisible to that
 * same statement anyway, and the next statement starts after the flush.
 *
 * Each row carries the subtransaction it was fired in.  A subtransaction
 * that commits hands its rows to its parent; one that aborts drops them,
 * exactly as it would have dropped rows already in the heap.  A row is
 * only ever written while its own subtransaction (or a child of it that
 * is committing) is current, so it lives or dies with the right one.
 * What is left at commit or PREPARE is written then; an abort discards
 * all.  The contexts and the list are made once per backend and reset,
 * so a one-row transaction pays for no context creation.
 */
typedef struct PendingRow
{
	Datum		given[NUM_GIVEN_COLUMNS];	/* see given_values */
	SubTransactionId subxid;
} PendingRow;

static MemoryContext pending_context = NULL;	/* the rows' text values */
static MemoryContext flush_context = NULL;	/* reset around each flush */
static PendingRow *pending = NULL;	/* PENDING_MAX entries */
static int	n_pending = 0;
static int	executor_finish_depth = 0;
static ExecutorFinish_hook_type prev_executor_finish = NULL;

/* Whether pending row i is one flush_pending(subxid) writes. */
#define PENDING_OF(i, subxid) \
	((subxid) == InvalidSubTransactionId || pending[i].subxid == (subxid))

/*
 * Write the pending rows of subtransaction subxid (all of them if subxid
 * is InvalidSubTransactionId) and drop them from the list.
 */
static void
flush_pending(SubTransactionId subxid)
{
	MemoryContext old;
	Datum	  **rows;
	int			n = 0;
	int			kept = 0;

	if (n_pending == 0)
		return;
	MemoryContextReset(flush_context);	/* a failed flush may have left some */
	old = MemoryContextSwitchTo(flush_context);
	rows = palloc(sizeof(Datum *) * n_pending);
	for (int i = 0; i < n_pending; i++)
		if (PENDING_OF(i, subxid))
			rows[n++] = pending[i].given;

	if (n > 0)
	{
		if (!xcapi_outbox_lookup_schema())
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("extension \"xcapi\" is not installed in this database")));
		if (direct_insert && n == 1)
			insert_directly(rows[0]);
		else if (direct_insert)
			insert_many_directly(rows, n);
		else
			for (int i = 0; i < n; i++)
				insert_through_spi(rows[i]);
	}
	MemoryContextSwitchTo(old);
	MemoryContextReset(flush_context);

	for (int i = 0; i < n_pending; i++)
		if (!PENDING_OF(i, subxid))
			pending[kept++] = pending[i];
	n_pending = kept;
	if (n_pending == 0)
		MemoryContextReset(pending_context);
}

static void
add_pending(const XcapiQueuedRow *row)
{
	SubTransactionId subxid = GetCurrentSubTransactionId();
	MemoryContext old;
	PendingRow *p;

	if (pending_context == NULL)
	{
		pending_context = AllocSetContextCreate(TopMemoryContext,
												"xcapi pending rows",
												ALLOCSET_DEFAULT_SIZES);
		flush_context = AllocSetContextCreate(TopMemoryContext,
											  "xcapi pending rows flush",
											  ALLOCSET_DEFAULT_SIZES);
		pending = MemoryContextAlloc(TopMemoryContext,
									 sizeof(PendingRow) * PENDING_MAX);
	}

	/*
	 * When full, write the current subtransaction's rows.  If the list is
	 * still full, it holds rows of outer levels (an inner statement fires
	 * while an outer one's rows wait): they must wait for their own level,
	 * so this row is written at once.
	 */
	if (n_pending >= PENDING_MAX)
		flush_pending(subxid);
	if (n_pending >= PENDING_MAX)
	{
		Datum		given[NUM_GIVEN_COLUMNS];

		given_values(given, row);
		insert_directly(given);
		return;
	}

	old = MemoryContextSwitchTo(pending_context);
	p = &pending[n_pending];
	given_values(p->given, row);
	p->subxid = subxid;
	n_pending++;
	MemoryContextSwitchTo(old);
}

/* ExecutorFinish runs the statement's AFTER triggers; write their rows. */
static void
outbox_executor_finish(QueryDesc *queryDesc)
{
	executor_finish_depth++;
	PG_TRY();
	{
		if (prev_executor_finish)
			prev_executor_finish(queryDesc);
		else
			standard_ExecutorFinish(queryDesc);
	}
	PG_FINALLY();
	{
		executor_finish_depth--;
	}
	PG_END_TRY();
	flush_pending(GetCurrentSubTransactionId());
}

static void
outbox_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	int			kept = 0;

	switch (event)
	{
		case SUBXACT_EVENT_COMMIT_SUB:
			for (int i = 0; i < n_pending; i++)
				if (pending[i].subxid == mySubid)
					pending[i].subxid = parentSubid;
			break;
		case SUBXACT_EVENT_ABORT_SUB:
			for (int i = 0; i < n_pending; i++)
				if (pending[i].subxid != mySubid)
					pending[kept++] = pending[i];
			n_pending = kept;
			break;
		default:
			break;
	}
}

static void
outbox_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			flush_pending(InvalidSubTransactionId);
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			/* before xcapi.c's callback, registered earlier, wakes the worker */
			publish_intake_block();
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
		case XACT_EVENT_PARALLEL_ABORT:
			/* nothing is pending after commit; an abort drops what was */
			intake_low_this_xact = InvalidBlockNumber;
			n_pending = 0;
			if (pending_context)
			{
				MemoryContextReset(pending_context);
				MemoryContextReset(flush_context);
			}
			executor_finish_depth = 0;
			/* an idle backend keeps a few slots, not a bulk load's worth */
			if (n_slots > SLOTS_KEPT)
			{
				MemoryContextDelete(slots_context);
				slots_context = NULL;
				n_slots = 0;
			}
			break;
		default:
			break;
	}
}

/* Called once, from _PG_init. */
void
xcapi_outbox_init(void)
{
	prev_executor_finish = ExecutorFinish_hook;
	ExecutorFinish_hook = outbox_executor_finish;
	RegisterXactCallback(outbox_xact_callback, NULL);
	RegisterSubXactCallback(outbox_subxact_callback, NULL);
}

/*
 * Insert one queued conversion; either way a role granted only EXECUTE on
 * xcapi_fire can enqueue without reading the queue.  When batchable (the
 * caller is an AFTER ROW trigger, whose rows nobody sees before the
 * statement ends) and an executor is finishing a statement, the row waits
 * to be written with the statement's others (see PendingRow).
 */
void
xcapi_outbox_insert(const XcapiQueuedRow *row, bool batchable)
{
	Datum		given[NUM_GIVEN_COLUMNS];

	if (direct_insert && batchable && executor_finish_depth > 0)
	{
		add_pending(row);
		return;
	}
	given_values(given, row);
	if (direct_insert)
		insert_directly(given);
	else
		insert_through_spi(given);
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
	sql = psprintf("UPDATE ONLY %s.xcapi_conversions SET status = 'queued', "
				   "next_attempt_at = now() WHERE status = 'sending'",
				   schema_name);
	rc = SPI_execute(sql, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "could not repair outbox: %s", SPI_result_code_string(rc));
	n = (int) SPI_processed;

	sql = psprintf("UPDATE ONLY %s.xcapi_conversions SET next_attempt_at = now()"
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
					" FROM ONLY %s.xcapi_conversions"
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
					"SELECT next_attempt_at FROM ONLY %s.xcapi_conversions"
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
					  "UPDATE ONLY %s.xcapi_conversions"
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
					  "UPDATE ONLY %s.xcapi_conversions"
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
					  "UPDATE ONLY %s.xcapi_conversions"
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
	sql = psprintf("UPDATE ONLY %s.xcapi_conversions SET next_attempt_at = now()"
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
					  "UPDATE ONLY %s.xcapi_conversions c SET next_attempt_at = u.until,"
					  " last_error = 'held back while the pixel is paused: ' || u.reason"
					  " FROM (SELECT id, pixel_id FROM ONLY %s.xcapi_conversions"
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
					  "DELETE FROM ONLY %s.xcapi_conversions WHERE id IN ("
					  " SELECT id FROM ONLY %s.xcapi_conversions"
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
 * A scan of the intake from block from to its current end, in heap order,
 * or NULL if from is past the end.
 */
static TableScanDesc
begin_intake_scan(Relation intake, Snapshot snapshot, BlockNumber from)
{
	BlockNumber nblocks = RelationGetNumberOfBlocks(intake);
	TableScanDesc scan;

	if (from >= nblocks)
		return NULL;
	scan = table_beginscan(intake, snapshot, 0, NULL);
	heap_setscanlimits(scan, from, nblocks - from);
	return scan;
}

/*
 * Insert the n rows in slots into the outbox's heap (one multi-insert)
 * and indexes.  values and nulls have room for one row.
 */
static void
file_batch(Relation outbox, Relation *idx, TupleTableSlot **slots, int n,
		   Datum *values, bool *nulls)
{
	TupleDesc	desc = RelationGetDescr(outbox);

	if (n == 0)
		return;
	heap_multi_insert(outbox, slots, n, GetCurrentCommandId(true), 0, NULL);
	for (int i = 0; i < n; i++)
	{
		heap_deform_tuple(ExecFetchSlotHeapTuple(slots[i], false, NULL), desc,
						  values, nulls);
		insert_index_entries(&filing_target, outbox, idx, values, nulls,
							 &slots[i]->tts_tid);
		ExecClearTuple(slots[i]);
	}
}

/*
 * The filing statement's work without the executor, when both tables are
 * as xcapi made them (see can_insert_directly): read up to limit intake
 * rows from block from on, delete each, and multi-insert the deleted ones
 * into the outbox with their index entries, PENDING_MAX at a time: no
 * executor, and one WAL record per page for the inserts instead of one per
 * row.  A row changed by someone else since the scan's snapshot is
 * left for a later pass, which finds its new version.  Sets *last to the
 * highest block read; returns how many rows were read.
 */
static int
file_directly(BlockNumber from, int limit, BlockNumber *last)
{
	Relation	outbox = table_open(table_oid, RowExclusiveLock);
	Relation	intake = table_open(intake_oid, RowExclusiveLock);
	TupleDesc	intake_desc = RelationGetDescr(intake);
	TupleDesc	outbox_desc = RelationGetDescr(outbox);
	TupleConversionMap *map = convert_tuples_by_name(intake_desc, outbox_desc);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	TableScanDesc scan = begin_intake_scan(intake, snapshot, from);
	CommandId	cid = GetCurrentCommandId(true);
	MemoryContext batch_context = AllocSetContextCreate(CurrentMemoryContext,
														"xcapi filing batch",
														ALLOCSET_DEFAULT_SIZES);
	Datum	   *values = palloc(sizeof(Datum) * outbox_desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * outbox_desc->natts);
	Relation   *idx = open_outbox_indexes(&filing_target);
	TupleTableSlot **slots = NULL;
	int			nslots = 0;
	HeapTuple	tup;
	int			read = 0;
	int			nbatch = 0;

	*last = from;
	while (scan != NULL && read < limit &&
		   (tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(batch_context);
		HeapTuple	copy;
		TM_FailureData tmfd;

		read++;
		*last = Max(*last, ItemPointerGetBlockNumber(&tup->t_self));
		/* values stored out of line belong to the intake's TOAST table */
		copy = HeapTupleHasExternal(tup) ? toast_flatten_tuple(tup, intake_desc) :
			heap_copytuple(tup);
		if (map != NULL)
			copy = execute_attr_map_tuple(copy, map);
		MemoryContextSwitchTo(old);
		if (heap_delete(intake, &tup->t_self, cid, InvalidSnapshot, true,
						&tmfd, false) != TM_Ok)
			continue;
		/* as many slots as rows, up to PENDING_MAX: a wake-up files few */
		if (nbatch == nslots)
		{
			nslots = Min(Max(2 * nslots, 16), PENDING_MAX);
			slots = flush_slots(outbox_desc, nslots);
		}
		ExecStoreHeapTuple(copy, slots[nbatch++], false);
		if (nbatch == PENDING_MAX)
		{
			file_batch(outbox, idx, slots, nbatch, values, nulls);
			nbatch = 0;
			MemoryContextReset(batch_context);
		}
	}
	file_batch(outbox, idx, slots, nbatch, values, nulls);
	if (scan != NULL)
		table_endscan(scan);
	UnregisterSnapshot(snapshot);
	close_outbox_indexes(&filing_target, idx);
	MemoryContextDelete(batch_context);
	table_close(intake, NoLock);
	table_close(outbox, NoLock);
	CommandCounterIncrement();	/* the claim that follows sees them */
	return read;
}

/*
 * The same with the SQL statement, which honours whatever someone added
 * to either table: the TIDs of up to limit intake rows from block from on,
 * then one DELETE ... RETURNING of them feeding one INSERT.  Sets *last to
 * the highest block read; returns how many rows were read.
 */
static int
file_through_spi(BlockNumber from, int limit, BlockNumber *last)
{
	Relation	intake = table_open(intake_oid, RowExclusiveLock);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	TableScanDesc scan = begin_intake_scan(intake, snapshot, from);
	ItemPointerData *tids = palloc(sizeof(ItemPointerData) * limit);
	Datum	   *datums = palloc(sizeof(Datum) * limit);
	Oid			types[1] = {TIDARRAYOID};
	Datum		values[1];
	HeapTuple	tup;
	int			n = 0;

	*last = from;
	while (scan != NULL && n < limit &&
		   (tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		tids[n] = tup->t_self;
		datums[n] = PointerGetDatum(&tids[n]);
		*last = Max(*last, ItemPointerGetBlockNumber(&tup->t_self));
		n++;
	}
	if (scan != NULL)
		table_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(intake, NoLock);
	if (n == 0)
		return 0;

	values[0] = PointerGetDatum(construct_array(datums, n, TIDOID,
												sizeof(ItemPointerData),
												false, TYPALIGN_SHORT));
	SPI_connect();
	run_plan(get_plan(PLAN_FILE_INTAKE,
					  "WITH moved AS (DELETE FROM ONLY %s.xcapi_conversions_intake"
					  " WHERE ctid = ANY ($1) RETURNING *)"
					  " INSERT INTO %s.xcapi_conversions SELECT * FROM moved",
					  1, types),
			 values, NULL, SPI_OK_INSERT);
	SPI_finish();
	return n;
}

/*
 * File rows of the intake into xcapi_conversions: up to limit rows, each
 * deleted from the intake and inserted into the outbox in the caller's
 * transaction, so that to every snapshot a conversion is in exactly one of
 * the two tables, and a crash either moved the whole chunk or none of it.
 * Without the executor (file_directly) when both tables are as xcapi made
 * them, otherwise through SQL (file_through_spi).
 *
 * The intake has no index, so where to read is worked out instead:
 * - a pass reads it in heap order from a start block to its end, a chunk
 *   per call (a heap scan from a cursor block), so that a large intake is
 *   not reread from block 0 for every chunk; a chunk shorter than limit
 *   ends the pass;
 * - a pass starts at the lowest block written by the transactions that
 *   committed since the last look (each publishes its lowest block at
 *   commit; the hint is taken before this call's snapshot, so every
 *   transaction it covers is visible), or continues where the last chunk
 *   stopped, whichever is lower;
 * - with no pass under way and no commit since, nothing is read at all:
 *   after a large intake has been emptied, its dead pages are not reread
 *   at every wake-up until autovacuum truncates them;
 * - once per xcapi.naptime a pass starts at block 0, which finds what no
 *   hint announced (a prepared transaction committed later, a row written
 *   by plain SQL).
 * Returns whether more rows may be waiting.
 */
bool
xcapi_outbox_file_intake(int limit)
{
	static BlockNumber cursor = InvalidBlockNumber;	/* where a pass stopped */
	static TimestampTz last_full_pass = 0;
	TimestampTz now = GetCurrentTimestamp();
	BlockNumber from = cursor;
	BlockNumber last;
	int			n;

	if (!OidIsValid(intake_oid))
		return false;
	if (xcapi_shared != NULL)
	{
		BlockNumber hint = pg_atomic_exchange_u32(&xcapi_shared->intake_low_block,
												  InvalidBlockNumber);

		from = Min(from, hint);
	}
	if (xcapi_shared == NULL ||
		now - last_full_pass >= (TimestampTz) xcapi_naptime * USECS_PER_SEC)
	{
		from = 0;
		last_full_pass = now;
	}
	if (from == InvalidBlockNumber)
		return false;
	cursor = from;				/* if this call fails, the next starts here */

	lock_outbox_first();
	n = direct_filing ? file_directly(from, limit, &last) :
		file_through_spi(from, limit, &last);
	cursor = (n < limit) ? InvalidBlockNumber : last;
	return n == limit;
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
