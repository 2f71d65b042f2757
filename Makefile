# xcapi/Makefile — PGXS build; the version comes from xcapi.control.

EXTENSION = xcapi
EXTVERSION = $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" xcapi.control)

MODULE_big = xcapi
OBJS = src/xcapi.o src/fire.o src/identifiers.o src/outbox.o src/payload.o \
       src/sign.o src/http.o src/worker.o src/credentials.o src/pacing.o src/monitor.o

DATA = $(wildcard xcapi--*.sql)

PG_CPPFLAGS = -I$(srcdir)/src -DXCAPI_VERSION=\"$(EXTVERSION)\" \
              $(shell pkg-config --cflags libcurl openssl)
SHLIB_LINK = $(shell pkg-config --libs libcurl openssl)

REGRESS = upgrade signing identifiers api trigger settings monitor
REGRESS_OPTS = --temp-config=$(srcdir)/xcapi.conf --temp-instance=./tmp_regress \
               --load-extension=xcapi
ISOLATION = intake_locks
ISOLATION_OPTS = --temp-config=$(srcdir)/xcapi.conf --temp-instance=./tmp_isolation \
                 --load-extension=xcapi
TAP_TESTS = 1

EXTRA_CLEAN = tmp_regress tmp_isolation tmp_check output_iso

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# The isolation tests use the database xcapi.conf names for the worker.
ISOLATION_TESTDB = contrib_regression
