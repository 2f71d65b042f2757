/*-------------------------------------------------------------------------
 *
 * pacing.c
 *		Keeping each ad account under X's rate limit instead of running
 *		into 429s.
 *
 * X limits conversions per ad account per 15 minutes (60,000 events in
 * its guide; 100,000 requests in the v12 reference).  Both budgets are
 * settings.  Usage is kept in one counter per second over the last window
 * and one second more (a sliding window), so no window of that length,
 * and hence none of X's fixed windows, ever holds more than the budget.
 *
 * The account of a pixel is learned from X's answers (request.params.
 * account_id); until then a pixel counts as its own account.  Several
 * pixels of one account thus share one budget once X has named it.
 *
 * Worker-local state in TopMemoryContext; nothing here touches SQL.
 *
 * Copyright (c) 2026, the xcapi authors
 *
 * src/pacing.c
 *
 *-------------------------------------------------------------------------
 */
#include "xcapi.h"

#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#define KEY_LEN 65
#define MAX_WINDOW_SECS 3600

/*
 * One account's usage: per-second counters, indexed by second % (w + 1).
 * What was sent during second s is counted until the end of second s + w:
 * sent as late as s + 0.999, it must still count w seconds later, so no
 * real-time window of w seconds ever holds more than the budget.
 */
#define NSLOTS (MAX_WINDOW_SECS + 1)

typedef struct Budget
{
	char		key[KEY_LEN];	/* "a:<account>" or "p:<pixel>" */
	int64		second[NSLOTS];
	int32		events[NSLOTS];
	int32		requests[NSLOTS];
} Budget;

typedef struct PixelAccount
{
	char		pixel[KEY_LEN];
	char		account[KEY_LEN];	/* "" until X names it */
} PixelAccount;

static HTAB *budgets = NULL;
static HTAB *accounts = NULL;

static void
pacing_init(void)
{
	HASHCTL		ctl;

	ctl.keysize = KEY_LEN;
	ctl.entrysize = sizeof(Budget);
	ctl.hcxt = TopMemoryContext;
	budgets = hash_create("xcapi rate budgets", 16, &ctl,
						  HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	ctl.entrysize = sizeof(PixelAccount);
	accounts = hash_create("xcapi pixel accounts", 16, &ctl,
						   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
}

static PixelAccount *
pixel_account(const char *pixel)
{
	char		key[KEY_LEN] = {0};
	bool		found;
	PixelAccount *pa;

	if (accounts == NULL)
		pacing_init();
	strlcpy(key, pixel, KEY_LEN);
	pa = hash_search(accounts, key, HASH_ENTER, &found);
	if (!found)
		pa->account[0] = '\0';
	return pa;
}

static Budget *
budget_for(const char *pixel)
{
	PixelAccount *pa = pixel_account(pixel);
	char		key[KEY_LEN] = {0};
	bool		found;
	Budget	   *b;

	if (pa->account[0])
		snprintf(key, KEY_LEN, "a:%s", pa->account);
	else
		snprintf(key, KEY_LEN, "p:%s", pixel);
	b = hash_search(budgets, key, HASH_ENTER, &found);
	if (!found)
	{
		memset(b->second, 0, sizeof(b->second));
		memset(b->events, 0, sizeof(b->events));
		memset(b->requests, 0, sizeof(b->requests));
	}
	return b;
}

static int
window_secs(void)
{
	return Min(Max(xcapi_rate_window, 1), MAX_WINDOW_SECS);
}

/* Zero the slot of second s if it still holds an older second. */
static int
slot_of(Budget *b, int64 s)
{
	int			i = (int) (s % (window_secs() + 1));

	if (b->second[i] != s)
	{
		b->second[i] = s;
		b->events[i] = 0;
		b->requests[i] = 0;
	}
	return i;
}

/* True if the slot holds usage that still counts during second now. */
static bool
slot_live(Budget *b, int i, int64 now)
{
	return b->second[i] >= now - window_secs() && b->second[i] <= now;
}

/*
 * How many of want conversions of pixel may go in one request now.  When
 * fewer than want may (0 included), *resume_at is when the window will
 * have room for all of them (or for a request at all).
 */
int
xcapi_pacing_allow(const char *pixel, int want, TimestampTz now,
				   TimestampTz *resume_at)
{
	Budget	   *b;
	int64		now_s = (int64) (now / USECS_PER_SEC);
	int			w = window_secs();
	int64		used_events = 0;
	int64		used_requests = 0;
	int64		allowed;
	int64		need_events;
	int64		need_requests;

	if (xcapi_rate_limit_events <= 0 && xcapi_rate_limit_requests <= 0)
		return want;

	b = budget_for(pixel);
	for (int i = 0; i <= w; i++)
	{
		if (slot_live(b, i, now_s))
		{
			used_events += b->events[i];
			used_requests += b->requests[i];
		}
	}

	allowed = want;
	if (xcapi_rate_limit_events > 0)
		allowed = Min(allowed, Max(xcapi_rate_limit_events - used_events, 0));
	if (xcapi_rate_limit_requests > 0 &&
		used_requests >= xcapi_rate_limit_requests)
		allowed = 0;
	if (allowed >= want)
		return want;

	/* walk the window from its oldest second until enough has expired */
	need_events = xcapi_rate_limit_events > 0 ?
		used_events + want - xcapi_rate_limit_events : 0;
	need_requests = xcapi_rate_limit_requests > 0 ?
		used_requests + 1 - xcapi_rate_limit_requests : 0;
	*resume_at = (TimestampTz) (now_s + w + 1) * USECS_PER_SEC;
	for (int64 s = now_s - w; s <= now_s; s++)
	{
		int			i = (int) (s % (w + 1));

		if (b->second[i] != s)
			continue;
		need_events -= b->events[i];
		need_requests -= b->requests[i];
		if (need_events <= 0 && need_requests <= 0)
		{
			/* that second stops counting at the end of second s + w */
			*resume_at = (TimestampTz) (s + w + 1) * USECS_PER_SEC;
			break;
		}
	}
	return (int) allowed;
}

/* Count one request carrying n conversions of pixel. */
void
xcapi_pacing_record(const char *pixel, int n, TimestampTz now)
{
	Budget	   *b;
	int			i;

	if (xcapi_rate_limit_events <= 0 && xcapi_rate_limit_requests <= 0)
		return;
	b = budget_for(pixel);
	i = slot_of(b, (int64) (now / USECS_PER_SEC));
	b->events[i] += n;
	b->requests[i] += 1;
}

/*
 * X named the ad account of pixel.  From now on the pixel shares that
 * account's budget; what it used so far moves along.
 */
void
xcapi_pacing_learn_account(const char *pixel, const char *account)
{
	PixelAccount *pa = pixel_account(pixel);
	Budget	   *from;
	Budget	   *to;

	if (account == NULL || account[0] == '\0' || strlen(account) > KEY_LEN - 3 ||
		strcmp(pa->account, account) == 0)
		return;
	from = budget_for(pixel);
	strlcpy(pa->account, account, KEY_LEN);
	to = budget_for(pixel);
	for (int i = 0; i < NSLOTS; i++)
	{
		if (from->second[i] == 0)
			continue;
		if (to->second[i] != from->second[i])
		{
			if (to->second[i] > from->second[i])
				continue;
			to->second[i] = from->second[i];
			to->events[i] = 0;
			to->requests[i] = 0;
		}
		to->events[i] += from->events[i];
		to->requests[i] += from->requests[i];
	}
	hash_search(budgets, from->key, HASH_REMOVE, NULL);
}

/* The account X named for pixel, or NULL. */
const char *
xcapi_pacing_account(const char *pixel)
{
	PixelAccount *pa = pixel_account(pixel);

	return pa->account[0] ? pa->account : NULL;
}
