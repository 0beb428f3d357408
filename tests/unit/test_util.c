/*
 * test_util.c - unit tests for util/ and log/: hex, UUIDs, constant-time
 * compare, file reading limits, RFC 3339 time.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cloudsweep/util.h"
#include "tap.h"

int main(void)
{
	char hex[9], uuid[37], uuid2[37], ts[40], path[] = "/tmp/cs_test_util_XXXXXX";
	const unsigned char bytes[] = { 0xde, 0xad, 0xbe, 0xef };
	struct timespec t = { 0, 5000000 };
	size_t len;
	char *s;
	int fd;

	cs_hex(hex, bytes, 4);
	is_str(hex, "deadbeef", "hex encodes");

	cs_uuid4(uuid);
	cs_uuid4(uuid2);
	ok(strlen(uuid) == 36 && uuid[14] == '4' && strchr("89ab", uuid[19]) != NULL,
	   "uuid4 is version 4, variant 1: %s", uuid);
	ok(strcmp(uuid, uuid2) != 0, "two uuids differ");

	ok(cs_consttime_eq("abc", "abc", 3), "consttime equal");
	ok(!cs_consttime_eq("abc", "abd", 3), "consttime different");

	cs_rfc3339(ts, sizeof(ts), &t);
	is_str(ts, "1970-01-01T00:00:00.005Z", "rfc3339 of epoch + 5 ms");

	fd = mkstemp(path);
	ok(fd >= 0 && write(fd, "secret\n", 7) == 7, "temp file written");
	close(fd);
	s = cs_read_file(path, 64, &len);
	ok(s != NULL && len == 7, "read whole file");
	cs_rstrip(s);
	is_str(s, "secret", "rstrip removes newline");
	cs_free_secret(s);
	ok(cs_read_file(path, 3, NULL) == NULL, "file over the limit is refused");
	unlink(path);
	ok(cs_read_file(path, 64, NULL) == NULL, "missing file is an error");

	s = xasprintf("%d-%s", 7, "x");
	is_str(s, "7-x", "xasprintf");
	free(s);
	return tap_done();
}
