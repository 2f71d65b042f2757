/*-------------------------------------------------------------------------
 *
 * http.c
 *		libcurl transport: concurrent POSTs over kept-alive TLS connections.
 *
 * One multi handle lives for the whole life of the worker and keeps the
 * connection pool, so consecutive batches reuse their TLS connections.
 * A call sends a set of requests concurrently and returns when every one
 * has an answer or a transport error; it knows nothing of SQL or of what
 * the answers mean.  Certificate verification is always on; xcapi.ca_file
 * adds one more trusted CA next to the system's.
 *
 * Easy handles and header lists are released on every path, an ERROR
 * crossing the transfer loop included.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/http.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include <arpa/inet.h>
#include <curl/curl.h>

#include "miscadmin.h"
#include "storage/ipc.h"

/* Answers are error messages at most; more than this is not kept. */
#define MAX_RESPONSE_BYTES (64 * 1024)

/* How often the transfer loop looks at interrupts, in ms. */
#define POLL_INTERVAL_MS 100

/* Where Debian's OpenSSL keeps the system CAs, hashed. */
#define SYSTEM_CA_PATH "/etc/ssl/certs"

static CURLM *multi = NULL;

static void
http_cleanup(int code, Datum arg)
{
	if (multi)
	{
		curl_multi_cleanup(multi);
		multi = NULL;
	}
	curl_global_cleanup();
}

/* A fresh multi handle: it owns the pool of kept-alive connections. */
static void
open_multi(void)
{
	multi = curl_multi_init();
	if (multi == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create libcurl multi handle")));
	curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) 64);
}

/* Once per worker: global libcurl state and the connection-keeping handle. */
void
xcapi_http_init(void)
{
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not initialize libcurl")));
	open_multi();
	on_proc_exit(http_cleanup, (Datum) 0);
}

/*
 * Drop kept-alive connections, e.g. after the CA or the URL changed, so
 * that no connection made under the old settings is reused.
 */
void
xcapi_http_reset_connections(void)
{
	if (multi)
	{
		curl_multi_cleanup(multi);
		multi = NULL;
		open_multi();
	}
}

/*
 * The request body is handed to libcurl through a read callback with no
 * seek callback, on purpose: when a kept-alive connection turns out dead,
 * libcurl would otherwise silently resend the same request, with the same
 * OAuth nonce, which X treats as a replay.  Unable to rewind, it fails
 * with CURLE_SEND_FAIL_REWIND instead, and the worker resends with a
 * fresh signature.
 */
static size_t
supply_body(char *buffer, size_t size, size_t nitems, void *userdata)
{
	XcapiHttpRequest *req = userdata;
	size_t		room = size * nitems;
	size_t		left = req->body_len - req->body_sent;
	size_t		n = Min(room, left);

	memcpy(buffer, req->body + req->body_sent, n);
	req->body_sent += n;
	return n;
}

/*
 * May credentials be sent to url?  Over https always (the certificate is
 * verified); over plain http only to a loopback host, for tests.  The host
 * is taken from libcurl's own URL parser, the one that will connect, so
 * user information ("http://localhost@elsewhere") cannot fool the check.
 */
bool
xcapi_http_url_is_safe(const char *url)
{
	CURLU	   *u = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	bool		safe = false;

	if (u == NULL)
		return false;
	if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
	{
		if (pg_strcasecmp(scheme, "https") == 0)
			safe = true;
		else if (pg_strcasecmp(scheme, "http") == 0)
		{
			struct in_addr addr;

			safe = pg_strcasecmp(host, "localhost") == 0 ||
				strcmp(host, "[::1]") == 0 ||
				(strncmp(host, "127.", 4) == 0 &&
				 inet_pton(AF_INET, host, &addr) == 1);
		}
	}
	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
	return safe;
}

static size_t
collect_body(char *data, size_t size, size_t nmemb, void *userdata)
{
	XcapiHttpRequest *req = userdata;
	size_t		len = size * nmemb;
	size_t		room = MAX_RESPONSE_BYTES - Min(req->response.len,
												MAX_RESPONSE_BYTES);

	appendBinaryStringInfo(&req->response, data, Min(len, room));
	return len;
}

/* Integer value of header line "name: value" if the name matches. */
static bool
header_value(const char *line, size_t len, const char *name, int64 *out)
{
	size_t		nlen = strlen(name);
	char		buf[32];
	size_t		vlen;
	const char *v;
	char	   *end;

	if (len <= nlen + 1 || pg_strncasecmp(line, name, nlen) != 0 ||
		line[nlen] != ':')
		return false;
	v = line + nlen + 1;
	while (v < line + len && (*v == ' ' || *v == '\t'))
		v++;
	vlen = Min((size_t) (line + len - v), sizeof(buf) - 1);
	memcpy(buf, v, vlen);
	buf[vlen] = '\0';
	*out = strtoll(buf, &end, 10);
	return end != buf;
}

/*
 * Rate-limit headers.  The account-level reset wins over the user-level
 * one, as X's SDKs do.
 */
static size_t
collect_header(char *data, size_t size, size_t nmemb, void *userdata)
{
	XcapiHttpRequest *req = userdata;
	size_t		len = size * nmemb;
	int64		v;

	if (header_value(data, len, "x-account-rate-limit-reset", &v))
		req->rate_limit_reset = v;
	else if (header_value(data, len, "x-rate-limit-reset", &v))
	{
		if (req->rate_limit_reset == 0)
			req->rate_limit_reset = v;
	}
	else if (header_value(data, len, "x-account-rate-limit-remaining", &v))
		req->rate_limit_remaining = v;
	else if (header_value(data, len, "x-rate-limit-remaining", &v))
	{
		if (req->rate_limit_remaining < 0)
			req->rate_limit_remaining = v;
	}
	else if (header_value(data, len, "retry-after", &v))
		req->retry_after = v;
	return len;
}

static CURL *
make_handle(XcapiHttpRequest *req)
{
	CURL	   *h = curl_easy_init();
	struct curl_slist *headers = NULL;

	if (h == NULL)
		return NULL;
	req->handle = h;

	{
		const char *lines[] = {"Content-Type: application/json",
			req->auth_header,
			/* no "Expect: 100-continue" round trip before large bodies */
		"Expect:"};

		for (int i = 0; i < (int) lengthof(lines); i++)
		{
			struct curl_slist *next = curl_slist_append(headers, lines[i]);

			if (next == NULL)
				return NULL;
			req->headers = headers = next;
		}
	}

	curl_easy_setopt(h, CURLOPT_URL, req->url);
	/* cleartext (loopback tests) never goes through a proxy */
	if (pg_strncasecmp(req->url, "https:", 6) != 0)
		curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_1_1);
	curl_easy_setopt(h, CURLOPT_POST, 1L);
	curl_easy_setopt(h, CURLOPT_READFUNCTION, supply_body);
	curl_easy_setopt(h, CURLOPT_READDATA, req);
	curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) req->body_len);
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(h, CURLOPT_USERAGENT, "xcapi/" XCAPI_VERSION);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long) xcapi_connect_timeout);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long) xcapi_request_timeout);
	curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
	if (xcapi_ca_file && xcapi_ca_file[0] != '\0')
	{
		curl_easy_setopt(h, CURLOPT_CAINFO, xcapi_ca_file);
		curl_easy_setopt(h, CURLOPT_CAPATH, SYSTEM_CA_PATH);
	}
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, collect_body);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, req);
	curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, collect_header);
	curl_easy_setopt(h, CURLOPT_HEADERDATA, req);
	curl_easy_setopt(h, CURLOPT_PRIVATE, req);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, req->transport_error);
	return h;
}

static void
release_handles(XcapiHttpRequest **requests, int n)
{
	for (int i = 0; i < n; i++)
	{
		XcapiHttpRequest *req = requests[i];

		if (req->handle)
		{
			curl_multi_remove_handle(multi, req->handle);
			curl_easy_cleanup(req->handle);
			req->handle = NULL;
		}
		if (req->headers)
		{
			curl_slist_free_all(req->headers);
			req->headers = NULL;
		}
	}
}

static void
record_result(CURL *h, CURLcode code)
{
	XcapiHttpRequest *req = NULL;

	curl_easy_getinfo(h, CURLINFO_PRIVATE, (char **) &req);
	if (req == NULL)
		return;
	if (code == CURLE_OK)
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &req->http_status);
	else
	{
		req->http_status = 0;
		req->resend_refused = (code == CURLE_SEND_FAIL_REWIND);
		if (req->transport_error[0] == '\0')
			strlcpy(req->transport_error, curl_easy_strerror(code),
					sizeof(req->transport_error));
	}
}

/*
 * Send all requests concurrently and wait for every answer.  Each request
 * ends with http_status set, or 0 and transport_error set.  Interrupts are
 * serviced at least every POLL_INTERVAL_MS; the handles are released even
 * if one of them ends this process.
 */
void
xcapi_http_perform(XcapiHttpRequest **requests, int n)
{
	for (int i = 0; i < n; i++)
	{
		XcapiHttpRequest *req = requests[i];

		req->http_status = 0;
		req->transport_error[0] = '\0';
		req->resend_refused = false;
		req->body_sent = 0;
		req->rate_limit_reset = 0;
		req->rate_limit_remaining = -1;
		req->retry_after = -1;
		req->handle = NULL;
		req->headers = NULL;
		initStringInfo(&req->response);
	}

	PG_TRY();
	{
		int			running = 0;

		for (int i = 0; i < n; i++)
		{
			CURL	   *h = make_handle(requests[i]);

			if (h == NULL || curl_multi_add_handle(multi, h) != CURLM_OK)
			{
				strlcpy(requests[i]->transport_error,
						"could not set up the HTTP request",
						sizeof(requests[i]->transport_error));
				if (h)
				{
					curl_easy_cleanup(h);
					requests[i]->handle = NULL;
				}
				continue;
			}
			running++;
		}

		while (running > 0)
		{
			CURLMsg    *msg;
			int			left;
			CURLMcode	mc = curl_multi_perform(multi, &running);

			if (mc != CURLM_OK)
				ereport(ERROR,
						(errcode(ERRCODE_INTERNAL_ERROR),
						 errmsg("could not drive HTTP transfers"),
						 errdetail("libcurl: %s", curl_multi_strerror(mc))));
			while ((msg = curl_multi_info_read(multi, &left)) != NULL)
			{
				if (msg->msg == CURLMSG_DONE)
					record_result(msg->easy_handle, msg->data.result);
			}
			if (running > 0)
				curl_multi_poll(multi, NULL, 0, POLL_INTERVAL_MS, NULL);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_FINALLY();
	{
		release_handles(requests, n);
	}
	PG_END_TRY();
}
