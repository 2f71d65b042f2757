/*-------------------------------------------------------------------------
 *
 * payload.c
 *		The JSON that goes to X: one conversion object, a batch body, and
 *		the messages of X's error answers.
 *
 * A conversion object is built once, at enqueue time, and stored in the
 * outbox exactly as it will be sent; a batch body is then only the stored
 * objects joined together, so the worker never re-encodes anything.
 *
 * Field order and formats follow X's own request example: conversion_time
 * in UTC with milliseconds and "Z", identifiers inside "identifiers",
 * "value" as a decimal string and content_price as a JSON number, both
 * with at least two fraction digits.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/payload.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

/* Longest string accepted inside contents[]. */
#define MAX_CONTENT_STRING 1024

/*
 * Append a decimal number's text with two or more fraction digits and no
 * needless trailing zeros ("20" -> "20.00", "20.5" -> "20.50", "20.125"
 * unchanged, "0.07000" -> "0.07").
 */
void
xcapi_json_decimal(StringInfo dst, const char *numeric_text)
{
	const char *dot = strchr(numeric_text, '.');
	size_t		len = strlen(numeric_text);
	size_t		fraction;

	/* drop trailing zeros of the scale (0.0700 -> 0.07), keep two digits */
	if (dot != NULL)
	{
		while (len > (size_t) (dot - numeric_text) + 3 &&
			   numeric_text[len - 1] == '0')
			len--;
	}
	appendBinaryStringInfo(dst, numeric_text, len);
	fraction = dot ? len - (dot - numeric_text) - 1 : 0;
	if (dot == NULL)
		appendStringInfoString(dst, ".00");
	else if (fraction < 2)
		appendStringInfoChar(dst, '0');
}

/* n (0 <= n < 10^width) in exactly width decimal digits, at dst. */
static char *
put_digits(char *dst, int n, int width)
{
	Assert(n >= 0);
	for (int i = width - 1; i >= 0; i--)
	{
		dst[i] = '0' + n % 10;
		n /= 10;
	}
	return dst + width;
}

/*
 * conversion_time as X wants it: 2022-02-18T01:14:00.603Z.  The last one
 * is kept: the rows of one statement mostly share theirs (the transaction
 * start, by default), and a trigger firing for each of 100,000 rows
 * need not take the same timestamp apart 100,000 times.
 */
static void
append_x_time(StringInfo dst, TimestampTz ts)
{
	static TimestampTz last_ts = DT_NOBEGIN;
	static char last_text[sizeof("2022-02-18T01:14:00.603Z")];
	struct pg_tm tm;
	fsec_t		fsec;
	char	   *p = last_text;

	if (ts != last_ts || ts == DT_NOBEGIN)
	{
		if (TIMESTAMP_NOT_FINITE(ts) ||
			timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0 ||
			tm.tm_year < 0 || tm.tm_year > 9999)
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("argument \"conversion_time\" is out of range")));
		/* by hand: a printf per conversion is a measurable share of a trigger */
		p = put_digits(p, tm.tm_year, 4);
		*p++ = '-';
		p = put_digits(p, tm.tm_mon, 2);
		*p++ = '-';
		p = put_digits(p, tm.tm_mday, 2);
		*p++ = 'T';
		p = put_digits(p, tm.tm_hour, 2);
		*p++ = ':';
		p = put_digits(p, tm.tm_min, 2);
		*p++ = ':';
		p = put_digits(p, tm.tm_sec, 2);
		*p++ = '.';
		p = put_digits(p, (int) (fsec / 1000), 3);
		*p++ = 'Z';
		*p = '\0';
		last_ts = ts;
	}
	appendBinaryStringInfo(dst, last_text, sizeof(last_text) - 1);
}

/*
 * value as a JSON string.  Same output as PostgreSQL's escape_json, but
 * runs of plain characters are copied at once: hashes, ids and user agents
 * rarely need escaping, and this runs for every field of every conversion.
 */
static void
append_json_string(StringInfo dst, const char *value)
{
	const char *run = value;
	const char *p;

	appendStringInfoChar(dst, '"');
	for (p = value; *p; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c >= ' ' && c != '"' && c != '\\')
			continue;
		appendBinaryStringInfo(dst, run, p - run);
		run = p + 1;
		switch (c)
		{
			case '\b':
				appendStringInfoString(dst, "\\b");
				break;
			case '\f':
				appendStringInfoString(dst, "\\f");
				break;
			case '\n':
				appendStringInfoString(dst, "\\n");
				break;
			case '\r':
				appendStringInfoString(dst, "\\r");
				break;
			case '\t':
				appendStringInfoString(dst, "\\t");
				break;
			case '"':
				appendStringInfoString(dst, "\\\"");
				break;
			case '\\':
				appendStringInfoString(dst, "\\\\");
				break;
			default:
				appendStringInfo(dst, "\\u%04x", (int) c);
				break;
		}
	}
	appendBinaryStringInfo(dst, run, p - run);
	appendStringInfoChar(dst, '"');
}

static void
append_field(StringInfo dst, const char *key, const char *value)
{
	appendStringInfoChar(dst, ',');
	append_json_string(dst, key);
	appendStringInfoChar(dst, ':');
	append_json_string(dst, value);
}

/*
 * ,"key":"value" for a literal key, which needs no escaping: the prefix is
 * one constant, copied at once.
 */
#define APPEND_LITERAL_FIELD(dst, key, value) \
	append_prefixed((dst), ",\"" key "\":", (value))

static void
append_prefixed(StringInfo dst, const char *prefix, const char *value)
{
	appendStringInfoString(dst, prefix);
	append_json_string(dst, value);
}

/* {"key":"value"} for a literal key, after a comma unless it is the first */
#define APPEND_IDENTIFIER(dst, first, key, value) \
	do { \
		append_prefixed((dst), *(first) ? "{\"" key "\":" : ",{\"" key "\":", \
						(value)); \
		appendStringInfoChar((dst), '}'); \
		*(first) = false; \
	} while (0)

/*
 * The identifiers array, laid out as in X's example: one object each for
 * twclid, hashed_email and hashed_phone_number, and ip_address together
 * with user_agent in one more.  The caller guarantees at least one
 * identifier X accepts on its own, or both ip_address and user_agent.
 */
static void
append_identifiers(StringInfo dst, const XcapiConversion *conv)
{
	bool		first = true;

	appendStringInfoString(dst, ",\"identifiers\":[");
	if (conv->twclid)
		APPEND_IDENTIFIER(dst, &first, "twclid", conv->twclid);
	if (conv->hashed_email)
		APPEND_IDENTIFIER(dst, &first, "hashed_email", conv->hashed_email);
	if (conv->hashed_phone)
		APPEND_IDENTIFIER(dst, &first, "hashed_phone_number",
						  conv->hashed_phone);
	if (conv->ip_address || conv->user_agent)
	{
		appendStringInfoString(dst, first ? "{" : ",{");
		if (conv->ip_address)
		{
			append_json_string(dst, "ip_address");
			appendStringInfoChar(dst, ':');
			append_json_string(dst, conv->ip_address);
		}
		if (conv->user_agent)
		{
			if (conv->ip_address)
				appendStringInfoChar(dst, ',');
			append_json_string(dst, "user_agent");
			appendStringInfoChar(dst, ':');
			append_json_string(dst, conv->user_agent);
		}
		appendStringInfoChar(dst, '}');
	}
	appendStringInfoChar(dst, ']');
}

static void
contents_error(int index, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("argument \"contents\" is not valid: element %d %s",
					index, detail),
			 errhint("Pass a JSON array of objects with keys content_id, content_group_id, content_name, content_type, content_price and num_items.")));
}

/* A string-valued contents key: strings as they are, numbers as text. */
static void
append_content_string(StringInfo dst, int index, const char *key,
					  JsonbValue *v)
{
	char	   *s;

	if (v->type == jbvString)
		s = pnstrdup(v->val.string.val, v->val.string.len);
	else if (v->type == jbvNumeric)
		s = DatumGetCString(DirectFunctionCall1(numeric_out,
												NumericGetDatum(v->val.numeric)));
	else
		contents_error(index, psprintf("has a \"%s\" that is not a string", key));
	if (strlen(s) > MAX_CONTENT_STRING)
		contents_error(index, psprintf("has a \"%s\" longer than %d bytes",
									   key, MAX_CONTENT_STRING));
	append_field(dst, key, s);
}

/*
 * One contents[] element: validated and written with X's types, keys in a
 * fixed order so equal input always gives equal bytes.
 */
static void
append_content(StringInfo dst, int index, JsonbValue *elem)
{
	static const char *const keys[] = {"content_id", "content_group_id",
		"content_name", "content_type", "content_price", "num_items"};
	JsonbValue	found[lengthof(keys)];
	bool		present[lengthof(keys)] = {0};
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	StringInfoData obj;

	if (elem->type != jbvBinary || !JsonContainerIsObject(elem->val.binary.data))
		contents_error(index, "is not an object");

	it = JsonbIteratorInit(elem->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		int			k;
		char	   *key;

		if (tok != WJB_KEY)
			continue;
		key = pnstrdup(v.val.string.val, v.val.string.len);
		for (k = 0; k < (int) lengthof(keys); k++)
			if (strcmp(key, keys[k]) == 0)
				break;
		if (k == (int) lengthof(keys))
			contents_error(index, psprintf("has an unrecognized key \"%s\"", key));
		tok = JsonbIteratorNext(&it, &found[k], true);
		Assert(tok == WJB_VALUE);
		present[k] = found[k].type != jbvNull;
	}

	initStringInfo(&obj);
	for (int k = 0; k < 4; k++)
		if (present[k])
			append_content_string(&obj, index, keys[k], &found[k]);
	if (present[4])
	{
		char	   *num;

		if (found[4].type != jbvNumeric ||
			numeric_is_nan(found[4].val.numeric) ||
			numeric_is_inf(found[4].val.numeric) ||
			DatumGetBool(DirectFunctionCall2(numeric_lt,
											 NumericGetDatum(found[4].val.numeric),
											 DirectFunctionCall1(int4_numeric,
																 Int32GetDatum(0)))))
			contents_error(index, "has a \"content_price\" that is not a non-negative number");
		num = DatumGetCString(DirectFunctionCall1(numeric_out,
												  NumericGetDatum(found[4].val.numeric)));
		appendStringInfoString(&obj, ",\"content_price\":");
		xcapi_json_decimal(&obj, num);
	}
	if (present[5])
	{
		bool		have_error = false;
		int32		n = 0;

		if (found[5].type == jbvNumeric)
			n = numeric_int4_opt_error(found[5].val.numeric, &have_error);
		if (found[5].type != jbvNumeric || have_error || n <= 0 ||
			!DatumGetBool(DirectFunctionCall2(numeric_eq,
											  NumericGetDatum(found[5].val.numeric),
											  DirectFunctionCall1(int4_numeric, Int32GetDatum(n)))))
			contents_error(index, "has a \"num_items\" that is not a positive integer");
		appendStringInfo(&obj, ",\"num_items\":%d", n);
	}
	if (obj.len == 0)
		contents_error(index, "is an empty object");

	appendStringInfoChar(dst, '{');
	appendBinaryStringInfo(dst, obj.data + 1, obj.len - 1);
	appendStringInfoChar(dst, '}');
	pfree(obj.data);
}

static void
append_contents(StringInfo dst, Jsonb *contents)
{
	int			n;

	if (!JB_ROOT_IS_ARRAY(contents) || JB_ROOT_IS_SCALAR(contents))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"contents\" must be a JSON array of objects")));
	n = JB_ROOT_COUNT(contents);
	if (n == 0)
		return;
	appendStringInfoString(dst, ",\"contents\":[");
	for (int i = 0; i < n; i++)
	{
		JsonbValue *elem = getIthJsonbValueFromContainer(&contents->root, i);

		if (i > 0)
			appendStringInfoChar(dst, ',');
		append_content(dst, i + 1, elem);
	}
	appendStringInfoChar(dst, ']');
}

/*
 * The conversion object exactly as it is stored and sent.  Raises an
 * ERROR for contents X would reject.
 */
char *
xcapi_conversion_json(const XcapiConversion *conv)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"conversion_time\":\"");
	append_x_time(&buf, conv->conversion_time);
	appendStringInfoChar(&buf, '"');
	APPEND_LITERAL_FIELD(&buf, "event_id", conv->event_id);
	append_identifiers(&buf, conv);
	if (conv->value)
	{
		appendStringInfoString(&buf, ",\"value\":\"");
		xcapi_json_decimal(&buf, conv->value);
		appendStringInfoChar(&buf, '"');
	}
	if (conv->currency)
		APPEND_LITERAL_FIELD(&buf, "price_currency", conv->currency);
	if (conv->number_items > 0)
		appendStringInfo(&buf, ",\"number_items\":%d", conv->number_items);
	APPEND_LITERAL_FIELD(&buf, "conversion_id", conv->conversion_id);
	if (conv->description)
		APPEND_LITERAL_FIELD(&buf, "description", conv->description);
	if (conv->contents)
		append_contents(&buf, conv->contents);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/* {"conversions":[<payload>,<payload>,...]} */
void
xcapi_batch_body(StringInfo body, char **payloads, int n)
{
	appendStringInfoString(body, "{\"conversions\":[");
	for (int i = 0; i < n; i++)
	{
		if (i > 0)
			appendStringInfoChar(body, ',');
		appendStringInfoString(body, payloads[i]);
	}
	appendStringInfoString(body, "]}");
}

/*
 * Collecting errors[].code and errors[].message of an Ads API error body.
 */
typedef struct ErrorScan
{
	int			depth;			/* object/array nesting */
	bool		in_errors;		/* inside the top-level "errors" array */
	char	   *field;			/* current field name at depth 3 */
	char	   *code;
	StringInfo	out;
} ErrorScan;

static void
scan_object_start(void *state)
{
	ErrorScan  *s = state;

	s->depth++;
	if (s->depth == 3 && s->in_errors)
		s->code = NULL;
}

static void
scan_object_end(void *state)
{
	ErrorScan  *s = state;

	s->depth--;
}

static void
scan_array_start(void *state)
{
	((ErrorScan *) state)->depth++;
}

static void
scan_array_end(void *state)
{
	ErrorScan  *s = state;

	s->depth--;
	if (s->depth == 1)
		s->in_errors = false;
}

static void
scan_field_start(void *state, char *fname, bool isnull)
{
	ErrorScan  *s = state;

	if (s->depth == 1)
		s->in_errors = (strcmp(fname, "errors") == 0);
	s->field = (s->depth == 3 && s->in_errors) ? fname : NULL;
}

static void
scan_scalar(void *state, char *token, JsonTokenType tokentype)
{
	ErrorScan  *s = state;

	if (s->field == NULL || tokentype != JSON_TOKEN_STRING)
		return;
	if (strcmp(s->field, "code") == 0)
		s->code = token;
	else if (strcmp(s->field, "message") == 0)
	{
		if (s->out->len > 0)
			appendStringInfoString(s->out, "; ");
		if (s->code)
			appendStringInfo(s->out, "%s: ", s->code);
		appendStringInfoString(s->out, token);
	}
}

/*
 * X's own words from an error response: "CODE: message; CODE: message".
 * A body that is not the documented JSON (an HTML error page, say) is kept
 * as it is, cut short, since its text is still the best clue there is.
 */
char *
xcapi_error_messages(const char *response, size_t len)
{
	StringInfoData out;
	ErrorScan	scan = {0};
	JsonSemAction sem = {0};
	JsonLexContext *lex;

	initStringInfo(&out);
	if (len == 0)
		return out.data;

	scan.out = &out;
	sem.semstate = &scan;
	sem.object_start = scan_object_start;
	sem.object_end = scan_object_end;
	sem.array_start = scan_array_start;
	sem.array_end = scan_array_end;
	sem.object_field_start = scan_field_start;
	sem.scalar = scan_scalar;

	lex = makeJsonLexContextCstringLen(pnstrdup(response, len), len,
									   PG_UTF8, true);
	if (pg_parse_json(lex, &sem) != JSON_SUCCESS || out.len == 0)
	{
		resetStringInfo(&out);
		appendBinaryStringInfo(&out, response, Min(len, 300));
		/* keep the text printable and valid in the server encoding */
		for (int i = 0; i < out.len; i++)
			if ((unsigned char) out.data[i] < 0x20 ||
				(unsigned char) out.data[i] >= 0x7f)
				out.data[i] = ' ';
	}
	return out.data;
}

/* Finding request.params.account_id in a success answer. */
typedef struct AccountScan
{
	int			depth;
	bool		path_ok[4];		/* field names along the way matched */
	bool		want;
	char	   *account;
} AccountScan;

static void
acct_object_start(void *state)
{
	((AccountScan *) state)->depth++;
}

static void
acct_object_end(void *state)
{
	((AccountScan *) state)->depth--;
}

static void
acct_field_start(void *state, char *fname, bool isnull)
{
	AccountScan *s = state;
	static const char *const path[] = {"request", "params", "account_id"};

	s->want = false;
	if (s->depth < 1 || s->depth > 3)
		return;
	s->path_ok[s->depth] = strcmp(fname, path[s->depth - 1]) == 0 &&
		(s->depth == 1 || s->path_ok[s->depth - 1]);
	s->want = s->depth == 3 && s->path_ok[3];
}

static void
acct_scalar(void *state, char *token, JsonTokenType tokentype)
{
	AccountScan *s = state;

	if (s->want && tokentype == JSON_TOKEN_STRING && s->account == NULL)
		s->account = token;
	s->want = false;
}

/*
 * The ad account X says owns the pixel, from request.params.account_id of
 * an answer; NULL if absent or unparsable.
 */
char *
xcapi_response_account_id(const char *response, size_t len)
{
	AccountScan scan = {0};
	JsonSemAction sem = {0};
	JsonLexContext *lex;

	if (len == 0)
		return NULL;
	sem.semstate = &scan;
	sem.object_start = acct_object_start;
	sem.object_end = acct_object_end;
	sem.object_field_start = acct_field_start;
	sem.scalar = acct_scalar;
	lex = makeJsonLexContextCstringLen(pnstrdup(response, len), len,
									   PG_UTF8, true);
	if (pg_parse_json(lex, &sem) != JSON_SUCCESS)
		return NULL;
	return scan.account;
}
