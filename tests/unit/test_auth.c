/*
 * test_auth.c - TAP tests for access tokens and the permission matrix: a
 * token round-trips; tokens with another alg (none, HS/RS confusion), a bad
 * signature, a wrong issuer or audience, an expired exp or a future iat are
 * refused; every role holds exactly the permissions the API contract gives
 * it, with billing:* denied to admins.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jwt.h>

#include "cloudsweep/auth.h"
#include "cloudsweep/config.h"
#include "tap.h"

#define SECRET "0123456789abcdef0123456789abcdef-test-secret"

static struct config *cfg_with(const char *iss, const char *aud)
{
	char err[256];
	struct config *cfg = config_new();

	setenv("CLOUDSWEEP_JWT_SECRET", SECRET, 1);
	if (config_set(cfg, "jwt_issuer", iss, err, sizeof(err)) == -1 ||
	    config_set(cfg, "jwt_audience", aud, err, sizeof(err)) == -1 ||
	    config_finish(cfg, err, sizeof(err)) == -1)
		return NULL;
	return cfg;
}

static void claims(struct auth_claims *c, long long iat, long long exp)
{
	memset(c, 0, sizeof(*c));
	strcpy(c->sub, "11111111-1111-4111-8111-111111111111");
	strcpy(c->org, "22222222-2222-4222-8222-222222222222");
	strcpy(c->sid, "33333333-3333-4333-8333-333333333333");
	strcpy(c->jti, "44444444-4444-4444-8444-444444444444");
	strcpy(c->role, "member");
	c->iat = iat;
	c->exp = exp;
}

/* A token signed by libjwt directly, with any alg/key, for the refusal cases. */
static char *forge(jwt_alg_t alg, const char *key, const char *iss, long long iat, long long exp)
{
	jwt_t *jwt = NULL;
	char *tok;

	jwt_new(&jwt);
	jwt_add_grant(jwt, "iss", iss);
	jwt_add_grant(jwt, "aud", "cloudsweep-api");
	jwt_add_grant(jwt, "sub", "11111111-1111-4111-8111-111111111111");
	jwt_add_grant(jwt, "org", "22222222-2222-4222-8222-222222222222");
	jwt_add_grant(jwt, "sid", "33333333-3333-4333-8333-333333333333");
	jwt_add_grant(jwt, "jti", "44444444-4444-4444-8444-444444444444");
	jwt_add_grant(jwt, "role", "owner");
	jwt_add_grant_int(jwt, "iat", iat);
	jwt_add_grant_int(jwt, "exp", exp);
	jwt_set_alg(jwt, alg, (const unsigned char *)key, key != NULL ? (int)strlen(key) : 0);
	tok = jwt_encode_str(jwt);
	jwt_free(jwt);
	return tok;
}

int main(void)
{
	struct config *cfg = cfg_with("cloudsweep", "cloudsweep-api");
	char err[256];
	struct auth_claims c, out;
	long long now = (long long)time(NULL);
	char *tok;

	ok(cfg != NULL, "configuration with a JWT secret");
	if (cfg == NULL)
		return tap_done();
	ok(auth_keys_load(cfg, err, sizeof(err)) == 0, "keys load");

	claims(&c, now, now + 3600);
	tok = auth_token_issue(&c);
	ok(tok != NULL, "a token is issued");
	ok(auth_token_verify(tok, now, &out) == 0, "and verifies");
	is_str(out.sub, c.sub, "sub survives");
	is_str(out.role, "member", "role survives");
	ok(out.exp == now + 3600, "exp survives");
	ok(auth_token_verify(tok, now + 3600 + AUTH_CLOCK_SKEW_S + 1, &out) == -1,
	   "refused after exp plus the allowed skew");
	ok(auth_token_verify(tok, now + 3600 + AUTH_CLOCK_SKEW_S - 1, &out) == 0,
	   "accepted within the skew");
	tok[strlen(tok) - 2] = tok[strlen(tok) - 2] == 'A' ? 'B' : 'A';
	ok(auth_token_verify(tok, now, &out) == -1, "a changed signature is refused");
	free(tok);

	tok = forge(JWT_ALG_NONE, NULL, "cloudsweep", now, now + 60);
	ok(tok != NULL && auth_token_verify(tok, now, &out) == -1, "alg none is refused");
	free(tok);
	tok = forge(JWT_ALG_HS512, SECRET, "cloudsweep", now, now + 60);
	ok(auth_token_verify(tok, now, &out) == -1,
	   "another HMAC alg with the right key is refused");
	free(tok);
	tok = forge(JWT_ALG_HS256, "another secret, just as long as the real one", "cloudsweep",
	            now, now + 60);
	ok(auth_token_verify(tok, now, &out) == -1, "a token signed with another key is refused");
	free(tok);
	tok = forge(JWT_ALG_HS256, SECRET, "someone-else", now, now + 60);
	ok(auth_token_verify(tok, now, &out) == -1, "a wrong issuer is refused");
	free(tok);
	tok = forge(JWT_ALG_HS256, SECRET, "cloudsweep", now + 3600, now + 7200);
	ok(auth_token_verify(tok, now, &out) == -1, "a token issued in the future is refused");
	free(tok);
	tok = forge(JWT_ALG_HS256, SECRET, "cloudsweep", now, now + 60);
	ok(auth_token_verify(tok, now, &out) == 0, "the same forge with the real key verifies");
	free(tok);
	ok(auth_token_verify("a.b.c", now, &out) == -1, "garbage is refused");
	ok(auth_token_verify("", now, &out) == -1, "empty is refused");

	/* The permission matrix of the API contract. */
	{
		static const struct {
			const char *perm;
			bool viewer, member, admin, owner;
		} m[] = {
			{ "scans:read", true, true, true, true },
			{ "waste_items:read", true, true, true, true },
			{ "reports:read", true, true, true, true },
			{ "scans:create", false, true, true, true },
			{ "waste_items:approve", false, true, true, true },
			{ "aws_accounts:read", false, true, true, true },
			{ "aws_accounts:write", false, false, true, true },
			{ "waste_items:cleanup", false, false, true, true },
			{ "members:manage", false, false, true, true },
			{ "audit:read", false, false, true, true },
			{ "keys:rotate", false, false, true, true },
			{ "billing:read", false, false, false, true },
			{ "billing:manage", false, false, false, true },
			{ "no:such", false, false, false, false },
		};

		for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++) {
			ok(auth_role_allows(AUTH_ROLE_VIEWER, m[i].perm) == m[i].viewer &&
			       auth_role_allows(AUTH_ROLE_MEMBER, m[i].perm) == m[i].member &&
			       auth_role_allows(AUTH_ROLE_ADMIN, m[i].perm) == m[i].admin &&
			       auth_role_allows(AUTH_ROLE_OWNER, m[i].perm) == m[i].owner,
			   "matrix row %s", m[i].perm);
		}
		ok(!auth_role_allows(AUTH_ROLE_NONE, "scans:read"), "no role holds nothing");
		ok(auth_role_parse("owner") == AUTH_ROLE_OWNER && auth_role_parse("root") == 0,
		   "roles parse strictly");
	}
	auth_keys_free();
	config_free(cfg);
	return tap_done();
}
