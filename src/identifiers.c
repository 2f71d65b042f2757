/*-------------------------------------------------------------------------
 *
 * identifiers.c
 *		Normalization and SHA-256 hashing of the identifiers X matches on.
 *
 * X matches a conversion to a user by hashed email, hashed phone number,
 * click id (twclid), IP address and user agent.  Email and phone are
 * normalized exactly as X documents and hashed here, before anything is
 * stored, so raw PII never reaches the outbox.  A value that already is a
 * SHA-256 hex digest is taken as one and never hashed twice.
 *
 * Pure functions: they read no table and no setting.  Invalid input raises
 * an ERROR naming the SQL argument it came from.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/identifiers.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include <openssl/evp.h>

#include "fmgr.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(xcapi_hash_email);
PG_FUNCTION_INFO_V1(xcapi_normalize_phone);
PG_FUNCTION_INFO_V1(xcapi_hash_phone);

/* Longest accepted email address (RFC 5321 path limit). */
#define MAX_EMAIL_LEN 254

/* E.164: at most 15 digits; fewer than 7 is no real subscriber number. */
#define E164_MIN_DIGITS 7
#define E164_MAX_DIGITS 15

/* Letters a-z and digits only: how X writes pixel and event ids. */
bool
xcapi_is_base36(const char *s, size_t len)
{
	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'z')))
			return false;
	return true;
}

bool
xcapi_is_pixel_id(const char *s, size_t len)
{
	return len <= XCAPI_MAX_PIXEL_LEN && xcapi_is_base36(s, len);
}

/*
 * Lower-case hex SHA-256 of data into out (65 bytes with the terminator).
 *
 * The digest is fetched from OpenSSL's provider once and one context is
 * reused: with OpenSSL 3, EVP_Digest(..., EVP_sha256(), ...) looks the
 * algorithm up and allocates a context on every call, which cost a
 * trigger about as much as the hashing itself.  Both live as long as the
 * backend (one of each per process, nothing per call to free).
 */
void
xcapi_sha256_hex(const char *data, size_t len, char *out)
{
	static const char hex[] = "0123456789abcdef";
	static EVP_MD *sha256 = NULL;
	static EVP_MD_CTX *ctx = NULL;
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int digest_len = 0;

	if (sha256 == NULL)
		sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
	if (ctx == NULL)
		ctx = EVP_MD_CTX_new();
	if (sha256 == NULL || ctx == NULL ||
		EVP_DigestInit_ex2(ctx, sha256, NULL) != 1 ||
		EVP_DigestUpdate(ctx, data, len) != 1 ||
		EVP_DigestFinal_ex(ctx, digest, &digest_len) != 1 ||
		digest_len != 32)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute SHA-256 digest")));

	for (unsigned int i = 0; i < digest_len; i++)
	{
		out[2 * i] = hex[digest[i] >> 4];
		out[2 * i + 1] = hex[digest[i] & 0x0f];
	}
	out[64] = '\0';
}

/*
 * True if s is 64 hex digits of either case: a hash the caller made already.
 */
bool
xcapi_is_sha256_hex(const char *s, size_t len)
{
	if (len != 64)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		if (!isxdigit((unsigned char) s[i]))
			return false;
	}
	return true;
}

/* Bounds of s without leading and trailing ASCII whitespace. */
static void
trim_bounds(const char *s, const char **start, size_t *len)
{
	const char *end = s + strlen(s);

	while (*s && isspace((unsigned char) *s))
		s++;
	while (end > s && isspace((unsigned char) end[-1]))
		end--;
	*start = s;
	*len = end - s;
}

/* A pre-hashed value, lower-cased as X expects. */
static char *
lower_hash(const char *s)
{
	char	   *out = pnstrdup(s, 64);

	for (int i = 0; i < 64; i++)
		out[i] = pg_ascii_tolower((unsigned char) out[i]);
	return out;
}

/*
 * Hash an email address as X documents: trim, lower-case, SHA-256.
 *
 * Only ASCII letters are lower-cased: X specifies no Unicode case folding,
 * and a locale-dependent result would make the same address hash
 * differently on different servers.
 */
char *
xcapi_email_hash(const char *raw, const char *argname)
{
	const char *s;
	size_t		len;
	char	   *normalized;
	char	   *at = NULL;
	char	   *out;

	trim_bounds(raw, &s, &len);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" must not be empty", argname)));
	if (xcapi_is_sha256_hex(s, len))
		return lower_hash(s);
	if (len > MAX_EMAIL_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("argument \"%s\" is too long", argname),
				 errdetail("An email address has at most %d bytes.",
						   MAX_EMAIL_LEN)));

	normalized = pnstrdup(s, len);
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) normalized[i];

		if (isspace(c) || iscntrl(c))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"%s\" is not a valid email address",
							argname),
					 errdetail("An email address contains no whitespace or control characters.")));
		if (c == '@')
		{
			if (at != NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("argument \"%s\" is not a valid email address",
								argname),
						 errdetail("An email address contains exactly one \"@\".")));
			at = normalized + i;
		}
		normalized[i] = pg_ascii_tolower(c);
	}
	if (at == NULL || at == normalized || at[1] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" is not a valid email address",
						argname),
				 errdetail("An email address has the form local-part@domain.")));

	out = palloc(65);
	xcapi_sha256_hex(normalized, len, out);
	pfree(normalized);
	return out;
}

/*
 * Normalize a phone number to E.164: "+", country code, subscriber number,
 * digits only.
 *
 * Spaces, dashes, dots and parentheses are dropped and an international
 * "00" prefix becomes "+".  A number without a country code is refused: it
 * cannot be completed reliably, and a guessed country would hash to a
 * number that matches nobody.
 */
char *
xcapi_phone_normalize(const char *raw, const char *argname)
{
	const char *s;
	size_t		len;
	StringInfoData buf;
	int			digits = 0;
	size_t		i = 0;

	trim_bounds(raw, &s, &len);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" must not be empty", argname)));

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '+');
	if (s[0] == '+')
		i = 1;
	else if (len > 2 && s[0] == '0' && s[1] == '0')
		i = 2;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" is not a phone number in E.164 form",
						argname),
				 errdetail("The number does not start with \"+\" and a country code."),
				 errhint("Write the number with its country code, such as \"+14155550123\".")));

	for (; i < len; i++)
	{
		char		c = s[i];

		if (c >= '0' && c <= '9')
		{
			if (digits == 0 && c == '0')
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("argument \"%s\" is not a phone number in E.164 form",
								argname),
						 errdetail("A country code never starts with 0.")));
			appendStringInfoChar(&buf, c);
			digits++;
		}
		else if (c == ' ' || c == '-' || c == '.' || c == '(' || c == ')')
			continue;
		else
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("argument \"%s\" is not a phone number in E.164 form",
							argname),
					 errdetail("Only digits, spaces, \"-\", \".\", \"(\" and \")\" may follow the \"+\".")));
	}
	if (digits < E164_MIN_DIGITS || digits > E164_MAX_DIGITS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" is not a phone number in E.164 form",
						argname),
				 errdetail("The number has %d digits; E.164 numbers have %d to %d.",
						   digits, E164_MIN_DIGITS, E164_MAX_DIGITS)));
	return buf.data;
}

/*
 * Hash a phone number as X documents: E.164, then SHA-256 of the string
 * including its "+".
 */
char *
xcapi_phone_hash(const char *raw, const char *argname)
{
	const char *s;
	size_t		len;
	char	   *normalized;
	char	   *out;

	trim_bounds(raw, &s, &len);
	if (xcapi_is_sha256_hex(s, len))
		return lower_hash(s);

	normalized = xcapi_phone_normalize(raw, argname);
	out = palloc(65);
	xcapi_sha256_hex(normalized, strlen(normalized), out);
	pfree(normalized);
	return out;
}

/* SQL test entry points */

Datum
xcapi_hash_email(PG_FUNCTION_ARGS)
{
	char	   *raw = text_to_cstring(PG_GETARG_TEXT_PP(0));

	PG_RETURN_TEXT_P(cstring_to_text(xcapi_email_hash(raw, "email")));
}

Datum
xcapi_normalize_phone(PG_FUNCTION_ARGS)
{
	char	   *raw = text_to_cstring(PG_GETARG_TEXT_PP(0));

	PG_RETURN_TEXT_P(cstring_to_text(xcapi_phone_normalize(raw, "phone")));
}

Datum
xcapi_hash_phone(PG_FUNCTION_ARGS)
{
	char	   *raw = text_to_cstring(PG_GETARG_TEXT_PP(0));

	PG_RETURN_TEXT_P(cstring_to_text(xcapi_phone_hash(raw, "phone")));
}
