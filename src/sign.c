/*-------------------------------------------------------------------------
 *
 * sign.c
 *		OAuth 1.0a (RFC 5849) HMAC-SHA1 request signing, as X uses it.
 *
 * The conversions endpoint takes a JSON body, which is never part of the
 * signature base string (RFC 5849 section 3.4.1.3.1): only the query
 * parameters of the URL and the oauth_* parameters are signed.  Every
 * request gets a fresh nonce and timestamp, retries included, because X
 * uses the nonce to detect a replayed request.
 *
 * Pure functions apart from the random nonce; secrets are wiped from the
 * memory that held them once the signature is computed.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/sign.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(xcapi_percent_encode);
PG_FUNCTION_INFO_V1(xcapi_oauth_base_string);
PG_FUNCTION_INFO_V1(xcapi_oauth_signature);
PG_FUNCTION_INFO_V1(xcapi_oauth_header);

#define NONCE_LEN 32

/*
 * RFC 3986 percent-encoding of bytes, as OAuth requires: only
 * A-Z a-z 0-9 - . _ ~ are copied, everything else becomes %XX with
 * upper-case hex.  Written out rather than borrowed from libcurl so the
 * signature never depends on a library's notion of "unreserved".
 */
void
xcapi_percent_encode_into(StringInfo dst, const char *src, size_t len)
{
	static const char hex[] = "0123456789ABCDEF";

	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) src[i];

		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			(c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
			c == '~')
			appendStringInfoChar(dst, (char) c);
		else
		{
			appendStringInfoChar(dst, '%');
			appendStringInfoChar(dst, hex[c >> 4]);
			appendStringInfoChar(dst, hex[c & 0x0f]);
		}
	}
}

static char *
percent_encode(const char *s)
{
	StringInfoData buf;

	initStringInfo(&buf);
	xcapi_percent_encode_into(&buf, s, strlen(s));
	return buf.data;
}

/* Decode %XX and "+" of an application/x-www-form-urlencoded component. */
static char *
form_decode(const char *s, size_t len)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (size_t i = 0; i < len; i++)
	{
		if (s[i] == '%' && i + 2 < len &&
			isxdigit((unsigned char) s[i + 1]) &&
			isxdigit((unsigned char) s[i + 2]))
		{
			char		h[3] = {s[i + 1], s[i + 2], '\0'};

			appendStringInfoChar(&buf, (char) strtol(h, NULL, 16));
			i += 2;
		}
		else if (s[i] == '+')
			appendStringInfoChar(&buf, ' ');
		else
			appendStringInfoChar(&buf, s[i]);
	}
	return buf.data;
}

typedef struct EncodedParam
{
	char	   *name;
	char	   *value;
} EncodedParam;

static int
encoded_param_cmp(const void *a, const void *b)
{
	const EncodedParam *pa = (const EncodedParam *) a;
	const EncodedParam *pb = (const EncodedParam *) b;
	int			r = strcmp(pa->name, pb->name);

	return r != 0 ? r : strcmp(pa->value, pb->value);
}

/*
 * Split url into the base string URI (RFC 5849 section 3.4.1.2: scheme and
 * host lower-cased, default port dropped, no query or fragment) and its
 * decoded query parameters, appended to *params.
 */
static char *
base_string_uri(const char *url, List **query_params)
{
	const char *sep = strstr(url, "://");
	const char *authority;
	const char *path;
	const char *query;
	const char *end;
	StringInfoData buf;
	char	   *scheme;
	char	   *hostport;
	char	   *colon;

	if (sep == NULL || sep == url)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid URL \"%s\"", url),
				 errdetail("A URL starts with a scheme such as \"https://\".")));

	scheme = pnstrdup(url, sep - url);
	for (char *p = scheme; *p; p++)
		*p = pg_ascii_tolower((unsigned char) *p);

	authority = sep + 3;
	path = authority + strcspn(authority, "/?#");
	hostport = pnstrdup(authority, path - authority);
	for (char *p = hostport; *p; p++)
		*p = pg_ascii_tolower((unsigned char) *p);

	/* Drop the port when it is the scheme's default. */
	colon = strrchr(hostport, ':');
	if (colon != NULL && strchr(colon, ']') == NULL &&
		((strcmp(scheme, "https") == 0 && strcmp(colon + 1, "443") == 0) ||
		 (strcmp(scheme, "http") == 0 && strcmp(colon + 1, "80") == 0)))
		*colon = '\0';

	end = path + strcspn(path, "?#");
	initStringInfo(&buf);
	appendStringInfo(&buf, "%s://%s", scheme, hostport);
	if (end == path)
		appendStringInfoChar(&buf, '/');
	else
		appendBinaryStringInfo(&buf, path, end - path);

	if (*end == '?')
	{
		query = end + 1;
		while (*query && *query != '#')
		{
			size_t		plen = strcspn(query, "&#");
			const char *eq = memchr(query, '=', plen);

			if (plen > 0)
			{
				XcapiParam *p = palloc(sizeof(XcapiParam));

				if (eq != NULL)
				{
					p->name = form_decode(query, eq - query);
					p->value = form_decode(eq + 1, plen - (eq - query) - 1);
				}
				else
				{
					p->name = form_decode(query, plen);
					p->value = "";
				}
				*query_params = lappend(*query_params, p);
			}
			query += plen;
			if (*query == '&')
				query++;
		}
	}
	return buf.data;
}

/*
 * The signature base string (RFC 5849 section 3.4.1.1) of a request to url
 * with the given decoded parameters (oauth_* and form-encoded body ones;
 * the query parameters of url are added here).
 */
char *
xcapi_base_string(const char *method, const char *url,
				  XcapiParam *params, int nparams)
{
	List	   *query_params = NIL;
	char	   *uri = base_string_uri(url, &query_params);
	int			total = nparams + list_length(query_params);
	EncodedParam *enc = palloc(sizeof(EncodedParam) * Max(total, 1));
	StringInfoData normalized;
	StringInfoData out;
	int			n = 0;
	ListCell   *lc;

	for (int i = 0; i < nparams; i++)
	{
		enc[n].name = percent_encode(params[i].name);
		enc[n].value = percent_encode(params[i].value);
		n++;
	}
	foreach(lc, query_params)
	{
		XcapiParam *p = lfirst(lc);

		enc[n].name = percent_encode(p->name);
		enc[n].value = percent_encode(p->value);
		n++;
	}
	qsort(enc, n, sizeof(EncodedParam), encoded_param_cmp);

	initStringInfo(&normalized);
	for (int i = 0; i < n; i++)
		appendStringInfo(&normalized, "%s%s=%s", i > 0 ? "&" : "",
						 enc[i].name, enc[i].value);

	initStringInfo(&out);
	for (const char *m = method; *m; m++)
		appendStringInfoChar(&out, pg_ascii_toupper((unsigned char) *m));
	appendStringInfoChar(&out, '&');
	xcapi_percent_encode_into(&out, uri, strlen(uri));
	appendStringInfoChar(&out, '&');
	xcapi_percent_encode_into(&out, normalized.data, normalized.len);
	return out.data;
}

/*
 * base64(HMAC-SHA1(pct(consumer_secret) "&" pct(token_secret), base)).
 * The key is wiped before returning.
 */
char *
xcapi_hmac_sha1_base64(const char *consumer_secret, const char *token_secret,
					   const char *base_string)
{
	StringInfoData key;
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int digest_len = 0;
	unsigned char *ok;
	char	   *out;

	initStringInfo(&key);
	xcapi_percent_encode_into(&key, consumer_secret, strlen(consumer_secret));
	appendStringInfoChar(&key, '&');
	xcapi_percent_encode_into(&key, token_secret, strlen(token_secret));

	ok = HMAC(EVP_sha1(), key.data, key.len,
			  (const unsigned char *) base_string, strlen(base_string),
			  digest, &digest_len);
	explicit_bzero(key.data, key.maxlen);
	pfree(key.data);
	if (ok == NULL || digest_len != 20)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute HMAC-SHA1 signature")));

	out = palloc(4 * ((digest_len + 2) / 3) + 1);
	EVP_EncodeBlock((unsigned char *) out, digest, digest_len);
	return out;
}

/*
 * A nonce of NONCE_LEN random letters and digits from OpenSSL's CSPRNG,
 * drawn without modulo bias.
 */
void
xcapi_random_nonce(char *out)
{
	static const char alphabet[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
	int			filled = 0;

	while (filled < NONCE_LEN)
	{
		unsigned char bytes[64];

		if (RAND_bytes(bytes, sizeof(bytes)) != 1)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not generate random nonce")));
		for (int i = 0; i < (int) sizeof(bytes) && filled < NONCE_LEN; i++)
		{
			/* 248 = 4 * 62: bytes above it would favour some letters */
			if (bytes[i] < 248)
				out[filled++] = alphabet[bytes[i] % 62];
		}
	}
	out[NONCE_LEN] = '\0';
}

/*
 * The value of the Authorization header for a JSON POST to url:
 * "OAuth " and the seven oauth_* parameters sorted by name, each value
 * percent-encoded.  nonce NULL or timestamp < 0 draws fresh ones.
 */
char *
xcapi_oauth_authorization(const char *method, const char *url,
						  const char *consumer_key,
						  const char *consumer_secret,
						  const char *token, const char *token_secret,
						  const char *nonce, int64 timestamp)
{
	char		fresh_nonce[NONCE_LEN + 1];
	char		ts[32];
	XcapiParam	params[6];
	char	   *base;
	char	   *signature;
	StringInfoData hdr;

	if (nonce == NULL)
	{
		xcapi_random_nonce(fresh_nonce);
		nonce = fresh_nonce;
	}
	if (timestamp < 0)
		timestamp = (int64) time(NULL);
	snprintf(ts, sizeof(ts), INT64_FORMAT, timestamp);

	params[0].name = "oauth_consumer_key";
	params[0].value = consumer_key;
	params[1].name = "oauth_nonce";
	params[1].value = nonce;
	params[2].name = "oauth_signature_method";
	params[2].value = "HMAC-SHA1";
	params[3].name = "oauth_timestamp";
	params[3].value = ts;
	params[4].name = "oauth_token";
	params[4].value = token;
	params[5].name = "oauth_version";
	params[5].value = "1.0";

	base = xcapi_base_string(method, url, params, 6);
	signature = xcapi_hmac_sha1_base64(consumer_secret, token_secret, base);
	pfree(base);

	initStringInfo(&hdr);
	appendStringInfoString(&hdr, "OAuth ");
	for (int i = 0; i < 6; i++)
	{
		/* oauth_signature sorts between oauth_nonce and ..._method */
		if (i == 2)
		{
			appendStringInfoString(&hdr, "oauth_signature=\"");
			xcapi_percent_encode_into(&hdr, signature, strlen(signature));
			appendStringInfoString(&hdr, "\", ");
		}
		xcapi_percent_encode_into(&hdr, params[i].name, strlen(params[i].name));
		appendStringInfoString(&hdr, "=\"");
		xcapi_percent_encode_into(&hdr, params[i].value, strlen(params[i].value));
		appendStringInfoString(&hdr, i < 5 ? "\", " : "\"");
	}
	pfree(signature);
	return hdr.data;
}

/* SQL test entry points */

Datum
xcapi_percent_encode(PG_FUNCTION_ARGS)
{
	text	   *in = PG_GETARG_TEXT_PP(0);
	StringInfoData buf;

	initStringInfo(&buf);
	xcapi_percent_encode_into(&buf, VARDATA_ANY(in), VARSIZE_ANY_EXHDR(in));
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf.data, buf.len));
}

Datum
xcapi_oauth_base_string(PG_FUNCTION_ARGS)
{
	char	   *method = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(1));
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(2);
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	XcapiParam *params;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &nelems);
	if (nelems % 2 != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"params\" must hold name, value pairs"),
				 errdetail("The array has %d elements.", nelems)));

	params = palloc(sizeof(XcapiParam) * Max(nelems / 2, 1));
	for (int i = 0; i < nelems; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("argument \"params\" must not contain nulls")));
		if (i % 2 == 0)
			params[i / 2].name = TextDatumGetCString(elems[i]);
		else
			params[i / 2].value = TextDatumGetCString(elems[i]);
	}
	PG_RETURN_TEXT_P(cstring_to_text(xcapi_base_string(method, url, params,
													   nelems / 2)));
}

Datum
xcapi_oauth_signature(PG_FUNCTION_ARGS)
{
	char	   *base = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *cs = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *ts = text_to_cstring(PG_GETARG_TEXT_PP(2));

	PG_RETURN_TEXT_P(cstring_to_text(xcapi_hmac_sha1_base64(cs, ts, base)));
}

Datum
xcapi_oauth_header(PG_FUNCTION_ARGS)
{
	const char *argnames[] = {"method", "url", "consumer_key",
	"consumer_secret", "token", "token_secret"};
	char	   *args[6];
	char	   *nonce = NULL;
	int64		timestamp = -1;

	for (int i = 0; i < 6; i++)
	{
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("argument \"%s\" must not be null", argnames[i])));
		args[i] = text_to_cstring(PG_GETARG_TEXT_PP(i));
	}
	if (!PG_ARGISNULL(6))
		nonce = text_to_cstring(PG_GETARG_TEXT_PP(6));
	if (!PG_ARGISNULL(7))
	{
		timestamp = PG_GETARG_INT64(7);
		if (timestamp < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"oauth_timestamp\" must not be negative")));
	}
	PG_RETURN_TEXT_P(cstring_to_text(
									 xcapi_oauth_authorization(args[0], args[1], args[2], args[3],
															   args[4], args[5], nonce, timestamp)));
}
