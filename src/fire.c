/*-------------------------------------------------------------------------
 *
 * fire.c
 *		xcapi_fire and xcapi_fire_trigger: check a conversion, hash its
 *		identifiers and queue it in the caller's transaction.
 *
 * Everything X would reject is refused here, with an ERROR naming the
 * argument, rather than failing later in the worker where nobody sees it.
 * The conversion object is then built once, exactly as it will be sent,
 * and inserted into the outbox.  Nothing is sent before the caller
 * commits: the worker is woken by a commit callback, so a rolled-back
 * payment sends nothing.
 *
 * Accepted values (X documents few limits; these are ours, see README):
 *	pixel		base 36 (0-9, a-z), at most 64 characters
 *	event_id	base 36, or "tw-<pixel>-<event>" for the same pixel
 *	conversion_id, twclid	at most 256 bytes
 *	description, user_agent	at most 1024 bytes
 *	value		finite and not negative; currency three letters
 *	number_items	greater than zero
 *	conversion_time	at most 10 minutes ahead, at most 90 days old
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/fire.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include <arpa/inet.h>

#include "access/htup_details.h"
#include "access/relation.h"
#include "catalog/index.h"
#include "catalog/pg_type.h"
#include "commands/event_trigger.h"
#include "commands/trigger.h"
#include "access/table.h"
#include "catalog/pg_trigger.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "parser/parse_func.h"
#include "utils/syscache.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(xcapi_fire);
PG_FUNCTION_INFO_V1(xcapi_fire_trigger);
PG_FUNCTION_INFO_V1(xcapi_check_new_triggers);

#define MAX_ID_LEN 256
#define MAX_TEXT_LEN 1024
#define MAX_FUTURE_SECS (10 * SECS_PER_MINUTE)
#define MAX_AGE_DAYS 90

/* One conversion as the caller gave it, before checks. */
typedef struct FireInput
{
	char	   *pixel;
	char	   *event_id;
	char	   *conversion_id;	/* NULL: derive from the outbox id */
	Numeric		value;
	Jsonb	   *contents;
	char	   *email;
	char	   *phone;
	char	   *twclid;
	char	   *ip_address;
	char	   *user_agent;
	char	   *currency;
	bool		has_number_items;
	int32		number_items;
	char	   *description;
	bool		has_conversion_time;
	TimestampTz conversion_time;
	bool		ids_checked;	/* pixel and event_id already validated */
	bool		batchable;		/* an AFTER ROW trigger: see xcapi_outbox_insert */
} FireInput;

static void
require_not_null(const char *value, const char *argname)
{
	if (value == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"%s\" must not be null", argname)));
	if (value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" must not be empty", argname)));
}

static void
check_pixel(const char *pixel)
{
	require_not_null(pixel, "pixel");
	if (!xcapi_is_pixel_id(pixel, strlen(pixel)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"pixel\" is not a valid pixel id: \"%s\"",
						pixel),
				 errdetail("A pixel id is the base-36 id of an X pixel (lower-case letters and digits, at most %d), such as \"o8z6j\".",
						   XCAPI_MAX_PIXEL_LEN)));
}

/*
 * X accepts an event id alone ("o87ne") or prefixed with its pixel
 * ("tw-o8z6j-o87ne").  A prefix naming another pixel is certainly a
 * mistake: X would answer 404 for the whole batch.
 */
static void
check_event_id(const char *event_id, const char *pixel)
{
	size_t		len;

	require_not_null(event_id, "event_id");
	len = strlen(event_id);
	if (len > XCAPI_MAX_PIXEL_LEN * 2 + 4)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"event_id\" is too long")));
	if (strncmp(event_id, "tw-", 3) == 0)
	{
		const char *p = event_id + 3;
		const char *dash = strchr(p, '-');

		if (dash == NULL || !xcapi_is_base36(p, dash - p) ||
			!xcapi_is_base36(dash + 1, strlen(dash + 1)))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"event_id\" is not a valid event id: \"%s\"",
							event_id),
					 errdetail("An event id is either base 36, such as \"o87ne\", or \"tw-<pixel>-<event>\", such as \"tw-o8z6j-o87ne\".")));
		if ((size_t) (dash - p) != strlen(pixel) ||
			strncmp(p, pixel, dash - p) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"event_id\" belongs to another pixel: \"%s\"",
							event_id),
					 errdetail("The event id names pixel \"%.*s\" but the conversion is for pixel \"%s\".",
							   (int) (dash - p), p, pixel)));
	}
	else if (!xcapi_is_base36(event_id, len))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"event_id\" is not a valid event id: \"%s\"",
						event_id),
				 errdetail("An event id is either base 36, such as \"o87ne\", or \"tw-<pixel>-<event>\", such as \"tw-o8z6j-o87ne\".")));
}

/*
 * A free-text argument trimmed and checked for length; NULL stays NULL,
 * and so does a value that is empty after trimming.  Converted to UTF-8,
 * the only encoding X reads.
 */
static char *
clean_text(char *value, const char *argname, size_t maxlen)
{
	char	   *end;

	if (value == NULL)
		return NULL;
	while (isspace((unsigned char) *value))
		value++;
	end = value + strlen(value);
	while (end > value && isspace((unsigned char) end[-1]))
		end--;
	*end = '\0';
	if (*value == '\0')
		return NULL;
	if (strlen(value) > maxlen)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("argument \"%s\" is too long", argname),
				 errdetail("The value has %zu bytes; at most %zu are accepted.",
						   strlen(value), maxlen)));
	return pg_server_to_any(value, strlen(value), PG_UTF8);
}

static char *
clean_ip_address(char *value)
{
	unsigned char addr[16];

	value = clean_text(value, "ip_address", 64);
	if (value == NULL)
		return NULL;
	if (inet_pton(AF_INET, value, addr) != 1 &&
		inet_pton(AF_INET6, value, addr) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"ip_address\" is not a valid IP address: \"%s\"",
						value),
				 errdetail("Give an IPv4 address in dotted-decimal notation, such as \"8.25.197.25\", or an IPv6 address.")));
	return value;
}

static char *
clean_currency(char *value)
{
	value = clean_text(value, "currency", 3);
	if (value == NULL)
		return NULL;
	if (strlen(value) != 3 || !isalpha((unsigned char) value[0]) ||
		!isalpha((unsigned char) value[1]) || !isalpha((unsigned char) value[2]))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"currency\" is not an ISO 4217 currency code: \"%s\"",
						value),
				 errdetail("A currency code is three letters, such as \"USD\".")));
	for (int i = 0; i < 3; i++)
		value[i] = pg_ascii_toupper((unsigned char) value[i]);
	return value;
}

static char *
value_text(Numeric value)
{
	if (value == NULL)
		return NULL;
	if (numeric_is_nan(value) || numeric_is_inf(value))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"value\" must be a finite number")));
	if (DatumGetBool(DirectFunctionCall2(numeric_lt, NumericGetDatum(value),
										 DirectFunctionCall1(int4_numeric,
															 Int32GetDatum(0)))))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"value\" must not be negative")));
	return DatumGetCString(DirectFunctionCall1(numeric_out,
											   NumericGetDatum(value)));
}

/*
 * X counts conversions in attribution windows of at most 90 days, and a
 * time in the future is a clock or time-zone bug on the caller's side.
 */
static TimestampTz
check_conversion_time(const FireInput *in)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	TimestampTz t = in->has_conversion_time ? in->conversion_time : now;

	if (TIMESTAMP_NOT_FINITE(t))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("argument \"conversion_time\" must be finite")));
	if (t > now + (TimestampTz) MAX_FUTURE_SECS * USECS_PER_SEC)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("argument \"conversion_time\" is in the future"),
				 errdetail("It is more than %d minutes after the current time.",
						   MAX_FUTURE_SECS / SECS_PER_MINUTE)));
	if (t < now - (TimestampTz) MAX_AGE_DAYS * USECS_PER_DAY)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("argument \"conversion_time\" is older than %d days",
						MAX_AGE_DAYS),
				 errdetail("X attributes conversions within at most %d days.",
						   MAX_AGE_DAYS)));
	return t;
}

/*
 * Check one conversion, build its payload and queue it.  Returns the
 * outbox id.  Raw email and phone are hashed here and go no further.
 */
static int64
fire(FireInput *in)
{
	XcapiConversion conv = {0};
	XcapiQueuedRow row;
	int64		id;

	if (!in->ids_checked)
	{
		check_pixel(in->pixel);
		check_event_id(in->event_id, in->pixel);
	}

	conv.event_id = in->event_id;
	conv.twclid = clean_text(in->twclid, "twclid", MAX_ID_LEN);
	conv.ip_address = clean_ip_address(in->ip_address);
	conv.user_agent = clean_text(in->user_agent, "user_agent", MAX_TEXT_LEN);
	if (in->email)
		conv.hashed_email = xcapi_email_hash(in->email, "email");
	if (in->phone)
		conv.hashed_phone = xcapi_phone_hash(in->phone, "phone");

	if (!conv.twclid && !conv.hashed_email && !conv.hashed_phone)
	{
		if (!conv.ip_address && !conv.user_agent)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a conversion needs at least one identifier"),
					 errdetail("X matches conversions to users by email, phone, twclid, or ip_address together with user_agent."),
					 errhint("Pass at least one of the arguments \"email\", \"phone\", \"twclid\", or both \"ip_address\" and \"user_agent\".")));
		if (!conv.ip_address || !conv.user_agent)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"%s\" cannot be the only identifier",
							conv.ip_address ? "ip_address" : "user_agent"),
					 errdetail("X needs a second identifier with an IP address or a user agent."),
					 errhint("Also pass \"%s\", or one of \"email\", \"phone\", \"twclid\".",
							 conv.ip_address ? "user_agent" : "ip_address")));
	}

	conv.value = value_text(in->value);
	conv.currency = clean_currency(in->currency);
	if (in->has_number_items)
	{
		if (in->number_items <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"number_items\" must be greater than zero")));
		conv.number_items = in->number_items;
	}
	conv.description = clean_text(in->description, "description",
								  MAX_TEXT_LEN);
	conv.contents = in->contents;
	conv.conversion_time = check_conversion_time(in);

	if (in->conversion_id != NULL)
	{
		conv.conversion_id = clean_text(in->conversion_id, "conversion_id",
										MAX_ID_LEN);
		if (conv.conversion_id == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"conversion_id\" must not be empty")));
	}

	if (!xcapi_outbox_lookup_schema())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"xcapi\" is not installed in this database")));

	id = xcapi_outbox_next_id();
	/* No id of the caller's: the outbox id is stable across resends. */
	if (conv.conversion_id == NULL)
		conv.conversion_id = psprintf("xcapi-" INT64_FORMAT, id);

	row.id = id;
	row.pixel = in->pixel;
	row.event_id = in->event_id;
	row.conversion_id = conv.conversion_id;
	row.conversion_time = conv.conversion_time;
	row.payload = xcapi_conversion_json(&conv);
	xcapi_outbox_insert(&row, in->batchable);
	pfree((char *) row.payload);

	xcapi_note_fired(in->pixel);
	return id;
}

static char *
text_arg(FunctionCallInfo fcinfo, int n)
{
	return PG_ARGISNULL(n) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/*
 * xcapi_fire(pixel, event_id, conversion_id, value, contents, email, phone,
 *			  twclid, ip_address, user_agent, currency, number_items,
 *			  description, conversion_time) RETURNS bigint
 */
Datum
xcapi_fire(PG_FUNCTION_ARGS)
{
	FireInput	in = {0};

	in.pixel = text_arg(fcinfo, 0);
	in.event_id = text_arg(fcinfo, 1);
	in.conversion_id = text_arg(fcinfo, 2);
	in.value = PG_ARGISNULL(3) ? NULL : PG_GETARG_NUMERIC(3);
	in.contents = PG_ARGISNULL(4) ? NULL : PG_GETARG_JSONB_P(4);
	in.email = text_arg(fcinfo, 5);
	in.phone = text_arg(fcinfo, 6);
	in.twclid = text_arg(fcinfo, 7);
	in.ip_address = text_arg(fcinfo, 8);
	in.user_agent = text_arg(fcinfo, 9);
	in.currency = text_arg(fcinfo, 10);
	in.has_number_items = !PG_ARGISNULL(11);
	in.number_items = in.has_number_items ? PG_GETARG_INT32(11) : 0;
	in.description = text_arg(fcinfo, 12);
	if (PG_ARGISNULL(13))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"conversion_time\" must not be null"),
				 errhint("Leave it out to use the current time.")));
	in.has_conversion_time = true;
	in.conversion_time = PG_GETARG_TIMESTAMPTZ(13);

	PG_RETURN_INT64(fire(&in));
}

/*
 * The trigger function.
 *
 * Arguments: pixel, event id, then "field=column" pairs mapping columns of
 * the new row to conversion fields.  The parsed mapping is kept per
 * trigger and checked against the row type on each use (cheap), so a
 * later ALTER TABLE is noticed.  Without a conversion_id mapping, the id
 * is "<table>-<primary key>" (values joined by "-"): the same row always
 * gives the same id, so a re-run backfill or an UPDATE is deduplicated by
 * X.
 */
typedef enum MappedField
{
	F_CONVERSION_ID,
	F_VALUE,
	F_CURRENCY,
	F_EMAIL,
	F_PHONE,
	F_TWCLID,
	F_IP_ADDRESS,
	F_USER_AGENT,
	F_NUMBER_ITEMS,
	F_DESCRIPTION,
	F_CONTENTS,
	F_CONVERSION_TIME,
	NUM_FIELDS
} MappedField;

static const char *const field_names[NUM_FIELDS] = {
	"conversion_id", "value", "currency", "email", "phone", "twclid",
	"ip_address", "user_agent", "number_items", "description", "contents",
	"conversion_time"
};

typedef struct MappedColumn
{
	AttrNumber	attnum;			/* 0: field not mapped */
	Oid			typid;
	Oid			typoutput;
} MappedColumn;

typedef struct TriggerMapping
{
	Oid			tgoid;			/* hash key */
	Oid			relid;
	char	   *relname;
	char	   *pixel;
	char	   *event_id;
	MappedColumn	columns[NUM_FIELDS];
	int			npk;
	MappedColumn	pk[INDEX_MAX_KEYS];
} TriggerMapping;

static HTAB *mappings = NULL;

static void
mapping_error(Trigger *tg, Relation rel, int argno, const char *arg,
			  const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid argument %d \"%s\" of trigger \"%s\" on table \"%s\"",
					argno, arg, tg->tgname, RelationGetRelationName(rel)),
			 errdetail_internal("%s", detail),
			 errhint("Arguments are the pixel, the event id, then pairs field=column; fields are conversion_id, value, currency, email, phone, twclid, ip_address, user_agent, number_items, description, contents, conversion_time.")));
}

/* Can a column of type typid feed field f? */
static bool
type_fits(MappedField f, Oid typid)
{
	char		category;
	bool		preferred;

	get_type_category_preferred(typid, &category, &preferred);
	switch (f)
	{
		case F_VALUE:
			return category == TYPCATEGORY_NUMERIC;
		case F_NUMBER_ITEMS:
			return typid == INT2OID || typid == INT4OID || typid == INT8OID;
		case F_CONTENTS:
			return typid == JSONBOID || typid == JSONOID;
		case F_CONVERSION_TIME:
			return typid == TIMESTAMPTZOID || typid == TIMESTAMPOID ||
				typid == DATEOID;
		case F_CONVERSION_ID:
			/* any scalar whose text form is stable: ids, uuids, strings */
			return category == TYPCATEGORY_STRING ||
				category == TYPCATEGORY_NUMERIC ||
				category == TYPCATEGORY_USER || typid == UUIDOID;
		case F_IP_ADDRESS:
			return category == TYPCATEGORY_STRING ||
				category == TYPCATEGORY_NETWORK;
		default:
			return category == TYPCATEGORY_STRING;
	}
}

static void
set_column(MappedColumn *ref, TupleDesc desc, AttrNumber attnum)
{
	bool		varlena;

	ref->attnum = attnum;
	ref->typid = TupleDescAttr(desc, attnum - 1)->atttypid;
	getTypeOutputInfo(ref->typid, &ref->typoutput, &varlena);
}

/* Parse and check the trigger's arguments against its table; names in cxt. */
static void
build_mapping(TriggerMapping *m, Trigger *tg, Relation rel, MemoryContext cxt)
{
	TupleDesc	desc = RelationGetDescr(rel);
	MemoryContext old = MemoryContextSwitchTo(cxt);

	memset(m->columns, 0, sizeof(m->columns));
	m->npk = 0;
	m->relid = RelationGetRelid(rel);
	m->relname = pstrdup(RelationGetRelationName(rel));
	MemoryContextSwitchTo(old);

	if (tg->tgnargs < 2)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("trigger \"%s\" on table \"%s\" needs a pixel and an event id as its first two arguments",
						tg->tgname, RelationGetRelationName(rel))));
	check_pixel(tg->tgargs[0]);
	check_event_id(tg->tgargs[1], tg->tgargs[0]);

	for (int i = 2; i < tg->tgnargs; i++)
	{
		char	   *arg = tg->tgargs[i];
		char	   *eq = strchr(arg, '=');
		char	   *field;
		char	   *column;
		AttrNumber	attnum;
		int			f;

		if (eq == NULL || eq == arg || eq[1] == '\0')
			mapping_error(tg, rel, i + 1, arg, "Expected field=column.");
		field = pnstrdup(arg, eq - arg);
		column = eq + 1;
		for (f = 0; f < NUM_FIELDS; f++)
			if (strcmp(field, field_names[f]) == 0)
				break;
		if (f == NUM_FIELDS)
			mapping_error(tg, rel, i + 1, arg,
						  psprintf("\"%s\" is not a conversion field.", field));
		if (m->columns[f].attnum != 0)
			mapping_error(tg, rel, i + 1, arg,
						  psprintf("Field \"%s\" is mapped twice.", field));
		attnum = get_attnum(RelationGetRelid(rel), column);
		if (attnum == InvalidAttrNumber || attnum < 0)
			mapping_error(tg, rel, i + 1, arg,
						  psprintf("Table \"%s\" has no column \"%s\".",
								   RelationGetRelationName(rel), column));
		if (!type_fits(f, TupleDescAttr(desc, attnum - 1)->atttypid))
			mapping_error(tg, rel, i + 1, arg,
						  psprintf("Column \"%s\" has type %s, which cannot be used as %s.",
								   column,
								   format_type_be(TupleDescAttr(desc, attnum - 1)->atttypid),
								   field));
		set_column(&m->columns[f], desc, attnum);
	}

	if (m->columns[F_CONVERSION_ID].attnum == 0)
	{
		Oid			pkoid = RelationGetPrimaryKeyIndex(rel);
		Relation	idx;

		if (!OidIsValid(pkoid))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("trigger \"%s\" on table \"%s\" maps no conversion_id and the table has no primary key",
							tg->tgname, RelationGetRelationName(rel)),
					 errhint("Add an argument conversion_id=<column> naming a column that identifies the row.")));
		idx = relation_open(pkoid, AccessShareLock);
		m->npk = idx->rd_index->indnkeyatts;
		for (int k = 0; k < m->npk; k++)
			set_column(&m->pk[k], desc, idx->rd_index->indkey.values[k]);
		relation_close(idx, AccessShareLock);
	}

	old = MemoryContextSwitchTo(cxt);
	m->pixel = pstrdup(tg->tgargs[0]);
	m->event_id = pstrdup(tg->tgargs[1]);
	MemoryContextSwitchTo(old);
}

static bool
column_still_fits(const MappedColumn *ref, TupleDesc desc)
{
	Form_pg_attribute att;

	if (ref->attnum == 0)
		return true;
	if (ref->attnum > desc->natts)
		return false;
	att = TupleDescAttr(desc, ref->attnum - 1);
	return !att->attisdropped && att->atttypid == ref->typid;
}

/* The cached mapping of this trigger, (re)built if missing or stale. */
static TriggerMapping *
get_mapping(TriggerData *td)
{
	Oid			tgoid = td->tg_trigger->tgoid;
	TupleDesc	desc = RelationGetDescr(td->tg_relation);
	TriggerMapping *m;
	bool		found;
	bool		fresh = true;

	if (mappings == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(TriggerMapping);
		mappings = hash_create("xcapi trigger mappings", 16, &ctl,
							   HASH_ELEM | HASH_BLOBS);
	}
	m = hash_search(mappings, &tgoid, HASH_ENTER, &found);
	if (found && m->pixel != NULL && m->relid == RelationGetRelid(td->tg_relation))
	{
		for (int f = 0; f < NUM_FIELDS && fresh; f++)
			fresh = column_still_fits(&m->columns[f], desc);
		for (int k = 0; k < m->npk && fresh; k++)
			fresh = column_still_fits(&m->pk[k], desc);
		if (fresh)
			return m;
	}

	m->pixel = NULL;			/* invalid until fully built */
	PG_TRY();
	{
		build_mapping(m, td->tg_trigger, td->tg_relation, TopMemoryContext);
	}
	PG_CATCH();
	{
		hash_search(mappings, &tgoid, HASH_REMOVE, NULL);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return m;
}

static char *
column_text(HeapTuple tuple, TupleDesc desc, const MappedColumn *ref)
{
	bool		isnull;
	Datum		d;

	if (ref->attnum == 0)
		return NULL;
	d = heap_getattr(tuple, ref->attnum, desc, &isnull);
	if (isnull)
		return NULL;
	if (ref->typid == TEXTOID || ref->typid == VARCHAROID)
		return TextDatumGetCString(d);
	return OidOutputFunctionCall(ref->typoutput, d);
}

/* Fill a FireInput from the new row through the mapping. */
static void
row_to_input(TriggerMapping *m, HeapTuple tuple, TupleDesc desc,
			 FireInput *in)
{
	const MappedColumn *c = m->columns;
	bool		isnull;
	Datum		d;

	in->pixel = m->pixel;
	in->event_id = m->event_id;
	in->ids_checked = true;		/* by build_mapping, once per trigger */
	in->conversion_id = column_text(tuple, desc, &c[F_CONVERSION_ID]);
	in->currency = column_text(tuple, desc, &c[F_CURRENCY]);
	in->email = column_text(tuple, desc, &c[F_EMAIL]);
	in->phone = column_text(tuple, desc, &c[F_PHONE]);
	in->twclid = column_text(tuple, desc, &c[F_TWCLID]);
	in->ip_address = column_text(tuple, desc, &c[F_IP_ADDRESS]);
	in->user_agent = column_text(tuple, desc, &c[F_USER_AGENT]);
	in->description = column_text(tuple, desc, &c[F_DESCRIPTION]);

	if (c[F_IP_ADDRESS].attnum && c[F_IP_ADDRESS].typid != TEXTOID &&
		in->ip_address && strchr(in->ip_address, '/'))
		*strchr(in->ip_address, '/') = '\0';	/* inet "1.2.3.4/32" */

	if (c[F_VALUE].attnum)
	{
		d = heap_getattr(tuple, c[F_VALUE].attnum, desc, &isnull);
		if (!isnull)
			in->value = c[F_VALUE].typid == NUMERICOID ? DatumGetNumeric(d) :
				DatumGetNumeric(DirectFunctionCall3(numeric_in,
													CStringGetDatum(OidOutputFunctionCall(c[F_VALUE].typoutput, d)),
													ObjectIdGetDatum(InvalidOid),
													Int32GetDatum(-1)));
	}
	if (c[F_NUMBER_ITEMS].attnum)
	{
		d = heap_getattr(tuple, c[F_NUMBER_ITEMS].attnum, desc, &isnull);
		if (!isnull)
		{
			int64		n = c[F_NUMBER_ITEMS].typid == INT2OID ? DatumGetInt16(d) :
				c[F_NUMBER_ITEMS].typid == INT4OID ? DatumGetInt32(d) :
				DatumGetInt64(d);

			if (n > PG_INT32_MAX)
				ereport(ERROR,
						(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						 errmsg("argument \"number_items\" is out of range")));
			in->has_number_items = true;
			in->number_items = (int32) Max(n, PG_INT32_MIN);
		}
	}
	if (c[F_CONTENTS].attnum)
	{
		d = heap_getattr(tuple, c[F_CONTENTS].attnum, desc, &isnull);
		if (!isnull)
			in->contents = c[F_CONTENTS].typid == JSONBOID ?
				DatumGetJsonbP(d) :
				DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
												   CStringGetDatum(TextDatumGetCString(d))));
	}
	if (c[F_CONVERSION_TIME].attnum)
	{
		d = heap_getattr(tuple, c[F_CONVERSION_TIME].attnum, desc, &isnull);
		if (!isnull)
		{
			in->has_conversion_time = true;
			if (c[F_CONVERSION_TIME].typid == TIMESTAMPTZOID)
				in->conversion_time = DatumGetTimestampTz(d);
			else if (c[F_CONVERSION_TIME].typid == TIMESTAMPOID)
				in->conversion_time = DatumGetTimestampTz(DirectFunctionCall1(timestamp_timestamptz, d));
			else
				in->conversion_time = DatumGetTimestampTz(DirectFunctionCall1(date_timestamptz, d));
		}
	}

	if (m->npk > 0)
	{
		StringInfoData id;

		initStringInfo(&id);
		appendStringInfoString(&id, m->relname);
		for (int k = 0; k < m->npk; k++)
		{
			char	   *v = column_text(tuple, desc, &m->pk[k]);

			appendStringInfo(&id, "-%s", v ? v : "");
		}
		in->conversion_id = id.data;
	}
}

/* The oid of xcapi_fire_trigger() in the extension's schema. */
static Oid
get_fire_trigger_oid(void)
{
	List	   *name = list_make2(makeString(pstrdup(xcapi_outbox_schema_raw())),
								  makeString("xcapi_fire_trigger"));

	return LookupFuncName(name, 0, NULL, true);
}

static void wrong_trigger_kind(Trigger *tg);

/* Validate one of our triggers on table relid; raises on a bad mapping. */
static void
check_trigger(Oid tgoid, Oid relid)
{
	Relation	rel = table_open(relid, AccessShareLock);
	TriggerMapping m = {0};

	for (int i = 0; rel->trigdesc && i < rel->trigdesc->numtriggers; i++)
	{
		Trigger    *tg = &rel->trigdesc->triggers[i];

		if (tg->tgoid != tgoid)
			continue;
		if (!TRIGGER_FOR_AFTER(tg->tgtype) || !TRIGGER_FOR_ROW(tg->tgtype) ||
			TRIGGER_FOR_DELETE(tg->tgtype) || TRIGGER_FOR_TRUNCATE(tg->tgtype))
			wrong_trigger_kind(tg);
		build_mapping(&m, tg, rel, CurrentMemoryContext);
	}
	table_close(rel, AccessShareLock);
}

static void
wrong_trigger_kind(Trigger *tg)
{
	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("trigger \"%s\" must be AFTER INSERT or UPDATE ... FOR EACH ROW",
					tg->tgname)));
}

/*
 * xcapi_check_new_triggers(): event trigger at the end of CREATE TRIGGER.
 * Checks the arguments of every new trigger that calls xcapi_fire_trigger
 * against its table, so a bad mapping fails CREATE TRIGGER itself rather
 * than the first INSERT.
 */
Datum
xcapi_check_new_triggers(PG_FUNCTION_ARGS)
{
	Oid			fire_trigger_oid;
	int			ntriggers;
	Oid		   *triggers;

	/* trigger oid and table oid of each new trigger of ours */
	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("xcapi_check_new_triggers must be called as an event trigger")));
	if (!xcapi_outbox_lookup_schema())
		PG_RETURN_VOID();
	fire_trigger_oid = get_fire_trigger_oid();
	if (!OidIsValid(fire_trigger_oid))
		PG_RETURN_VOID();

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	{
		Oid			argtypes[1] = {OIDOID};
		Datum		args[1] = {ObjectIdGetDatum(fire_trigger_oid)};

		if (SPI_execute_with_args("SELECT t.oid, t.tgrelid"
								  " FROM pg_catalog.pg_event_trigger_ddl_commands() c"
								  " JOIN pg_catalog.pg_trigger t ON t.oid = c.objid"
								  " WHERE c.object_type = 'trigger' AND t.tgfoid = $1",
								  1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not list the new triggers");
	}
	ntriggers = (int) SPI_processed;
	triggers = palloc(sizeof(Oid) * 2 * Max(ntriggers, 1));
	for (int i = 0; i < ntriggers; i++)
	{
		bool		isnull;

		triggers[2 * i] = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[i],
														 SPI_tuptable->tupdesc,
														 1, &isnull));
		triggers[2 * i + 1] = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[i],
															 SPI_tuptable->tupdesc,
															 2, &isnull));
	}
	SPI_finish();

	for (int i = 0; i < ntriggers; i++)
		check_trigger(triggers[2 * i], triggers[2 * i + 1]);
	PG_RETURN_VOID();
}

/* Errors about a row's values say which trigger turned the row into a conversion. */
static void
trigger_error_context(void *arg)
{
	TriggerData *td = (TriggerData *) arg;

	errcontext("xcapi trigger \"%s\" on table \"%s\"",
			   td->tg_trigger->tgname, RelationGetRelationName(td->tg_relation));
}

Datum
xcapi_fire_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TriggerMapping *m;
	HeapTuple	tuple;
	FireInput	in = {0};
	ErrorContextCallback errcallback;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("xcapi_fire_trigger must be called as a trigger")));
	if (!TRIGGER_FIRED_AFTER(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(td->tg_event) ||
		  TRIGGER_FIRED_BY_UPDATE(td->tg_event)))
		wrong_trigger_kind(td->tg_trigger);

	m = get_mapping(td);
	tuple = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple :
		td->tg_trigtuple;

	errcallback.callback = trigger_error_context;
	errcallback.arg = td;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;
	row_to_input(m, tuple, RelationGetDescr(td->tg_relation), &in);
	in.batchable = true;		/* only AFTER ROW triggers get here */
	(void) fire(&in);
	error_context_stack = errcallback.previous;

	return PointerGetDatum(NULL);
}
