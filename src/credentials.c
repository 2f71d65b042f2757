/*-------------------------------------------------------------------------
 *
 * credentials.c
 *		Reading X credentials from xcapi.credentials_file.
 *
 * Secrets are never setting values: the postmaster logs every changed
 * setting with its value on reload.  Like ssl_key_file, a setting names a
 * file instead, read by the worker at start and on every reload and
 * refused if anyone but its owner may read it.
 *
 * The file looks like postgresql.conf: "name = 'value'" lines and "#"
 * comments.  Names are consumer_key, consumer_secret, access_token,
 * access_token_secret and pixel_token, each either bare (the default for
 * every pixel) or prefixed "<pixel_id>." (that pixel only).  Pixel ids are
 * base 36 and may start with a digit, which PostgreSQL's own parser would
 * refuse, hence this small parser.
 *
 * Which scheme a pixel uses: its own pixel_token if it has one; OAuth 1.0a
 * if it has any OAuth value of its own; else the default pixel_token if
 * there is one; else OAuth 1.0a with the defaults.  OAuth values missing
 * for the pixel are taken from the defaults.
 *
 * Values live only in this file's memory context and are wiped when it is
 * replaced.  Messages name the file and line, never a value.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/credentials.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include <sys/stat.h>

#include "storage/fd.h"
#include "utils/memutils.h"

typedef enum CredentialField
{
	CRED_CONSUMER_KEY,
	CRED_CONSUMER_SECRET,
	CRED_ACCESS_TOKEN,
	CRED_ACCESS_TOKEN_SECRET,
	CRED_PIXEL_TOKEN,
	CRED_NFIELDS
} CredentialField;

static const char *const field_names[CRED_NFIELDS] = {
	"consumer_key", "consumer_secret", "access_token",
	"access_token_secret", "pixel_token"
};

/* One set of values: the defaults (pixel NULL) or one pixel's. */
typedef struct CredentialSet
{
	char	   *pixel;
	char	   *values[CRED_NFIELDS];
} CredentialSet;

static MemoryContext cred_context = NULL;
static List *cred_sets = NIL;	/* of CredentialSet; defaults first */

/* Wipe and free what the previous load kept. */
static void
forget_credentials(void)
{
	ListCell   *lc;

	foreach(lc, cred_sets)
	{
		CredentialSet *set = lfirst(lc);

		for (int f = 0; f < CRED_NFIELDS; f++)
			if (set->values[f])
				explicit_bzero(set->values[f], strlen(set->values[f]));
	}
	cred_sets = NIL;
	if (cred_context)
		MemoryContextReset(cred_context);
}

static CredentialSet *
set_for(const char *pixel, bool create)
{
	ListCell   *lc;
	CredentialSet *set;
	MemoryContext old;

	foreach(lc, cred_sets)
	{
		set = lfirst(lc);
		if ((pixel == NULL && set->pixel == NULL) ||
			(pixel && set->pixel && strcmp(pixel, set->pixel) == 0))
			return set;
	}
	if (!create)
		return NULL;
	/* the list cells too must outlive the caller's context */
	old = MemoryContextSwitchTo(cred_context);
	set = palloc0(sizeof(CredentialSet));
	set->pixel = pixel ? pstrdup(pixel) : NULL;
	cred_sets = pixel ? lappend(cred_sets, set) : lcons(set, cred_sets);
	MemoryContextSwitchTo(old);
	return set;
}

static void
syntax_warning(const char *path, int lineno, const char *detail)
{
	ereport(WARNING,
			(errcode(ERRCODE_CONFIG_FILE_ERROR),
			 errmsg("syntax error in credentials file \"%s\", line %d",
					path, lineno),
			 errdetail_internal("%s", detail),
			 errhint("Lines look like \"consumer_key = '...'\" or \"<pixel_id>.pixel_token = '...'\".")));
}

/*
 * Parse one line into the sets.  Returns false (after a WARNING) on a
 * syntax error.  The value is copied into cred_context; the line buffer is
 * wiped by the caller.
 */
static bool
parse_line(const char *path, int lineno, char *line)
{
	char	   *p = line;
	char	   *name_start;
	size_t		name_len;
	char	   *dot;
	StringInfoData value;
	CredentialSet *set;
	char	   *pixel = NULL;
	const char *field;
	int			f;

	while (isspace((unsigned char) *p))
		p++;
	if (*p == '\0' || *p == '#')
		return true;

	name_start = p;
	while (*p && (isalnum((unsigned char) *p) || *p == '_' || *p == '.'))
		p++;
	name_len = p - name_start;
	while (isspace((unsigned char) *p))
		p++;
	if (name_len == 0 || *p != '=')
	{
		syntax_warning(path, lineno, "Expected a name followed by \"=\".");
		return false;
	}
	p++;
	while (isspace((unsigned char) *p))
		p++;

	initStringInfo(&value);
	if (*p == '\'')
	{
		p++;
		for (;;)
		{
			if (*p == '\0')
			{
				explicit_bzero(value.data, value.maxlen);
				syntax_warning(path, lineno, "Unterminated quoted value.");
				return false;
			}
			if (*p == '\'' && p[1] == '\'')
			{
				appendStringInfoChar(&value, '\'');
				p += 2;
			}
			else if (*p == '\'')
			{
				p++;
				break;
			}
			else
				appendStringInfoChar(&value, *p++);
		}
	}
	else
	{
		while (*p && !isspace((unsigned char) *p) && *p != '#')
			appendStringInfoChar(&value, *p++);
	}
	while (isspace((unsigned char) *p))
		p++;
	if (*p != '\0' && *p != '#')
	{
		explicit_bzero(value.data, value.maxlen);
		syntax_warning(path, lineno, "Unexpected text after the value.");
		return false;
	}

	name_start[name_len] = '\0';
	dot = strchr(name_start, '.');
	field = name_start;
	if (dot)
	{
		if (!xcapi_is_pixel_id(name_start, dot - name_start))
		{
			explicit_bzero(value.data, value.maxlen);
			syntax_warning(path, lineno,
						   "A pixel id has only lower-case letters and digits.");
			return false;
		}
		*dot = '\0';
		pixel = name_start;
		field = dot + 1;
	}
	for (f = 0; f < CRED_NFIELDS; f++)
		if (strcmp(field, field_names[f]) == 0)
			break;
	if (f == CRED_NFIELDS)
	{
		explicit_bzero(value.data, value.maxlen);
		/* not echoed: with name and value swapped it would be the secret */
		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("unrecognized name in credentials file \"%s\", line %d",
						path, lineno),
				 errhint("Valid names are consumer_key, consumer_secret, access_token, access_token_secret and pixel_token, optionally prefixed with \"<pixel_id>.\".")));
		return false;
	}

	set = set_for(pixel, true);
	if (set->values[f])
		explicit_bzero(set->values[f], strlen(set->values[f]));
	set->values[f] = MemoryContextStrdup(cred_context, value.data);
	explicit_bzero(value.data, value.maxlen);
	pfree(value.data);
	return true;
}

/*
 * (Re)read the credentials file.  Problems are reported as WARNINGs and
 * leave no credentials at all: a refused file must not keep being used.
 * Returns true if the file was read without error.
 */
bool
xcapi_credentials_load(void)
{
	const char *path = xcapi_credentials_file;
	struct stat st;
	FILE	   *fp;
	char		line[4096];
	int			lineno = 0;
	bool		ok = true;

	if (cred_context == NULL)
		cred_context = AllocSetContextCreate(TopMemoryContext,
											 "xcapi credentials",
											 ALLOCSET_SMALL_SIZES);
	forget_credentials();

	if (path == NULL || path[0] == '\0')
		return true;

	fp = AllocateFile(path, "r");
	if (fp == NULL)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not open credentials file \"%s\": %m", path)));
		return false;
	}
	if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode))
	{
		FreeFile(fp);
		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("credentials file \"%s\" is not a regular file", path)));
		return false;
	}
	if (st.st_mode & (S_IRWXG | S_IRWXO))
	{
		FreeFile(fp);
		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("credentials file \"%s\" has group or world access", path),
				 errdetail("File must have permissions u=rw (0600) or less."),
				 errhint("Run \"chmod 600 %s\" and reload the server.", path)));
		return false;
	}

	while (fgets(line, sizeof(line), fp) != NULL)
	{
		size_t		len = strlen(line);

		lineno++;
		if (len == sizeof(line) - 1 && line[len - 1] != '\n')
		{
			explicit_bzero(line, sizeof(line));
			ereport(WARNING,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("line %d of credentials file \"%s\" is too long",
							lineno, path)));
			ok = false;
			break;
		}
		if (!parse_line(path, lineno, line))
			ok = false;
		explicit_bzero(line, sizeof(line));
		if (!ok)
			break;
	}
	FreeFile(fp);

	if (!ok)
		forget_credentials();
	return ok;
}

static bool
has_oauth_value(CredentialSet *set)
{
	return set && (set->values[CRED_CONSUMER_KEY] ||
				   set->values[CRED_CONSUMER_SECRET] ||
				   set->values[CRED_ACCESS_TOKEN] ||
				   set->values[CRED_ACCESS_TOKEN_SECRET]);
}

/*
 * The credentials to send pixel's conversions with (see the file header
 * for the rules).  Returns false when there are none usable: no pixel
 * token and an incomplete OAuth set.  The strings point into this file's
 * context and stay valid until the next load.
 */
bool
xcapi_credentials_for(const char *pixel, XcapiCredentials *out)
{
	CredentialSet *own = set_for(pixel, false);
	CredentialSet *defaults = set_for(NULL, false);
	char	   *merged[CRED_NFIELDS] = {0};

	memset(out, 0, sizeof(*out));
	if (own && own->values[CRED_PIXEL_TOKEN])
	{
		out->pixel_token = own->values[CRED_PIXEL_TOKEN];
		return true;
	}
	if (!has_oauth_value(own) && defaults && defaults->values[CRED_PIXEL_TOKEN])
	{
		out->pixel_token = defaults->values[CRED_PIXEL_TOKEN];
		return true;
	}
	for (int f = 0; f < CRED_PIXEL_TOKEN; f++)
	{
		merged[f] = own && own->values[f] ? own->values[f] :
			defaults ? defaults->values[f] : NULL;
		if (merged[f] == NULL)
			return false;
	}
	out->consumer_key = merged[CRED_CONSUMER_KEY];
	out->consumer_secret = merged[CRED_CONSUMER_SECRET];
	out->access_token = merged[CRED_ACCESS_TOKEN];
	out->access_token_secret = merged[CRED_ACCESS_TOKEN_SECRET];
	return true;
}
