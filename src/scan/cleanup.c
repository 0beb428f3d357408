/*
 * cleanup.c - acting on approved waste items: POST /api/v1/waste-items/{id}/cleanup
 * and the batch POST /api/v1/waste-items/cleanup {ids, dry_run}.
 *
 * One request runs its items one after the other through one state machine
 * (struct cleanup, advanced by cleanup_advance on every database result,
 * credential session and AWS answer). For each item it reads the row (only
 * approved items, past the mark-then-act grace period), gets credentials
 * through scan_session, re-reads the resource from AWS and refuses when it
 * changed since the finding (attached, associated, protected, gone: the item
 * goes back to open with the reason in its outcome). A dry run then calls
 * the action with DryRun=true where the API has it; a real run snapshots a
 * volume before deleting it (the snapshot id is stored before the delete),
 * gives DeleteDBInstance a final snapshot, calls the action and stores the
 * outcome, the AWS request id and the status with the waste_item.cleaned
 * audit event in one transaction. Blast radius: a request acts on at most
 * cleanup_max_items_per_request items and an organization on at most
 * cleanup_max_items_per_day per 24 hours. Before the first change in AWS the
 * item is claimed (outcome.in_progress, cleanup_claim in sql/012), so two
 * requests never act on it at once and racing requests never exceed the
 * daily cap. Mark-then-act (cleanup_grace_days > 0): approval tags EC2 resources
 * cloudsweep:marked-for-deletion=<date> (scan_cleanup_mark) and cleanup is
 * refused until the grace period after approval passed.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/log.h"
#include "scan_int.h"

#define CLEANUP_PROTECT_TAG "cloudsweep:protect"
#define CLEANUP_MSG_MAX     512
#define CLEANUP_MARK_KEY    "cloudsweep:marked-for-deletion"

/* How an item type is re-read and acted on. */
struct cleanup_kind {
	const char *type;         /* the waste item type (check name) */
	enum aws_service service; /* EC2, ELBv2 (ELB for classic names), RDS */
	const char *describe;     /* the re-read action */
	const char *describe_id;  /* its id parameter */
	const char *node;         /* path of the resource in the describe answer */
	const char *action;       /* the cleanup action */
	const char *action_id;    /* its id parameter */
	bool snapshot_first;      /* CreateSnapshot before the action */
	bool final_snapshot;      /* FinalDBSnapshotIdentifier */
	bool dry_run;             /* the action takes DryRun */
};

static const struct cleanup_kind cleanup_kinds[] = {
	{ "ebs_unattached", AWS_EC2, "DescribeVolumes", "VolumeId.1", "volumeSet/item",
	  "DeleteVolume", "VolumeId", true, false, true },
	{ "ebs_stopped_instance", AWS_EC2, "DescribeVolumes", "VolumeId.1", "volumeSet/item",
	  "DeleteVolume", "VolumeId", true, false, true },
	{ "ebs_gp2_to_gp3", AWS_EC2, "DescribeVolumes", "VolumeId.1", "volumeSet/item",
	  "ModifyVolume", "VolumeId", false, false, true },
	{ "ebs_snapshot_orphaned", AWS_EC2, "DescribeSnapshots", "SnapshotId.1", "snapshotSet/item",
	  "DeleteSnapshot", "SnapshotId", false, false, true },
	{ "eip_unassociated", AWS_EC2, "DescribeAddresses", "AllocationId.1", "addressesSet/item",
	  "ReleaseAddress", "AllocationId", false, false, true },
	{ "eni_unattached", AWS_EC2, "DescribeNetworkInterfaces", "NetworkInterfaceId.1",
	  "networkInterfaceSet/item", "DeleteNetworkInterface", "NetworkInterfaceId", false, false,
	  true },
	{ "nat_gateway_idle", AWS_EC2, "DescribeNatGateways", "NatGatewayId.1",
	  "natGatewaySet/item", "DeleteNatGateway", "NatGatewayId", false, false, true },
	{ "ec2_idle", AWS_EC2, "DescribeInstances", "InstanceId.1",
	  "reservationSet/item/instancesSet/item", "StopInstances", "InstanceId.1", false, false,
	  true },
	{ "lb_idle", AWS_ELBV2, "DescribeLoadBalancers", "LoadBalancerArns.member.1",
	  "DescribeLoadBalancersResult/LoadBalancers/member", "DeleteLoadBalancer",
	  "LoadBalancerArn", false, false, false },
	{ "rds_idle", AWS_RDS, "DescribeDBInstances", "DBInstanceIdentifier",
	  "DescribeDBInstancesResult/DBInstances/DBInstance", "StopDBInstance",
	  "DBInstanceIdentifier", false, false, false },
	{ "rds_stopped", AWS_RDS, "DescribeDBInstances", "DBInstanceIdentifier",
	  "DescribeDBInstancesResult/DBInstances/DBInstance", "DeleteDBInstance",
	  "DBInstanceIdentifier", false, true, false },
};

/* Classic load balancers are named, not ARN'd: the same item type, another API. */
static const struct cleanup_kind cleanup_kind_clb = {
	"lb_idle",
	AWS_ELB,
	"DescribeLoadBalancers",
	"LoadBalancerNames.member.1",
	"DescribeLoadBalancersResult/LoadBalancerDescriptions/member",
	"DeleteLoadBalancer",
	"LoadBalancerName",
	false,
	false,
	false
};

enum cleanup_state {
	CLEANUP_QUOTA,    /* today's cleanups of the org counted */
	CLEANUP_READ,     /* the item's row read */
	CLEANUP_SESSION,  /* waiting for credentials */
	CLEANUP_DESCRIBE, /* the resource re-read */
	CLEANUP_REFUSE,   /* the item marked changed */
	CLEANUP_CLAIM,    /* the item claimed for the action */
	CLEANUP_DRY,      /* the DryRun action sent */
	CLEANUP_SNAPSHOT, /* CreateSnapshot sent */
	CLEANUP_SNAPSAVE, /* the snapshot id stored on the item */
	CLEANUP_ACTION,   /* the action sent */
	CLEANUP_BEGIN,    /* BEGIN for the outcome */
	CLEANUP_STORE,    /* the outcome stored */
	CLEANUP_AUDIT,    /* waste_item.cleaned appended */
	CLEANUP_COMMIT,   /* COMMIT sent */
};

enum cleanup_event {
	CLEANUP_EV_DB,      /* a database result (op->advance) */
	CLEANUP_EV_SESSION, /* credentials (or not) */
	CLEANUP_EV_AWS,     /* an AWS answer */
};

struct cleanup {
	struct http_op op;
	bool batch; /* the batch endpoint: answer {results} */
	bool dry_run;
	const char **ids; /* pool-owned; nids item ids */
	size_t nids, cur;
	json_t *results; /* owned; one entry per finished item */
	/* the current item (pool-owned strings) */
	const struct cleanup_kind *kind;
	const char *type, *resource_id, *region, *account_uuid, *purpose, *protect_tag;
	const char *snapshot_id;
	struct scan_session *session;        /* pending, or NULL */
	struct aws_owned_credentials *creds; /* owned, or NULL */
	struct aws_call *call;               /* pending, or NULL */
	char result_status[16];              /* cleaned / failed */
	char request_id[128];                /* AWS's request id of the action */
	char message[CLEANUP_MSG_MAX];       /* AWS's error, or the outcome */
	char aws_code[96];                   /* AWS's error code, "" on success */
};

static void cleanup_advance(struct cleanup *c, enum cleanup_event ev, enum db_event dbev,
                            const PGresult *res, const struct aws_result *ar);
static void cleanup_next(struct cleanup *c);

/* Drop what the current item holds outside the request: session, call, credentials. */
static void cleanup_release(struct cleanup *c)
{
	if (c->session != NULL)
		scan_session_cancel(c->session);
	c->session = NULL;
	if (c->call != NULL)
		aws_call_cancel(c->call);
	c->call = NULL;
	if (c->creds != NULL) {
		aws_owned_credentials_clear(c->creds);
		free(c->creds);
	}
	c->creds = NULL;
}

static void cleanup_on_cancel(struct http_op *op)
{
	struct cleanup *c = (struct cleanup *)op;

	cleanup_release(c);
	json_decref(c->results);
	c->results = NULL;
}

static void cleanup_db_cb(struct http_op *op, enum db_event ev, const PGresult *res)
{
	cleanup_advance((struct cleanup *)op, CLEANUP_EV_DB, ev, res, NULL);
}

static void cleanup_session_cb(void *arg, int status, const char *error_code,
                               const char *error_message, struct aws_owned_credentials *creds)
{
	struct cleanup *c = arg;

	c->session = NULL;
	c->creds = creds;
	if (status != 0) {
		snprintf(c->aws_code, sizeof(c->aws_code), "%s", error_code ? error_code : "");
		snprintf(c->message, sizeof(c->message), "%s",
		         error_message ? error_message : "no credentials");
	}
	cleanup_advance(c, CLEANUP_EV_SESSION, DB_OK, NULL, NULL);
}

static void cleanup_aws_cb(const struct aws_result *res, void *arg)
{
	struct cleanup *c = arg;

	c->call = NULL;
	cleanup_advance(c, CLEANUP_EV_AWS, DB_OK, NULL, res);
}

/* Record the current item's result and move on to the next item (or answer). */
static void cleanup_item_done(struct cleanup *c, json_t *entry)
{
	cleanup_release(c);
	if (json_array_append_new(c->results, entry) != 0) {
		http_op_fail(&c->op, 500, "internal", "out of memory");
		return;
	}
	c->cur++;
	cleanup_next(c);
}

/* The current item failed before acting: an error entry (status, code, message). */
static void cleanup_item_error(struct cleanup *c, int status, const char *code, const char *msg)
{
	cleanup_item_done(c,
	                  json_pack("{s:s, s:b, s:i, s:{s:s, s:s}}", "id", c->ids[c->cur], "ok", 0,
	                            "http_status", status, "error", "code", code, "message", msg));
}

/* Send one AWS call for the current item; false has ended the item. */
static bool cleanup_call(struct cleanup *c, enum aws_service svc, const char *action,
                         const struct aws_param *params, size_t n, bool mutating)
{
	struct aws_credentials view = aws_owned_credentials_view(c->creds);
	struct aws_request rq = { 0 };

	rq.service = svc;
	rq.region = c->region;
	rq.creds = &view;
	rq.action = action;
	rq.params = params;
	rq.nparams = n;
	rq.mutating = mutating;
	if (aws_worker_client() != NULL)
		c->call = aws_call(aws_worker_client(), &rq, cleanup_aws_cb, c);
	if (c->call == NULL) {
		cleanup_item_error(c, 500, "internal", "the AWS request could not be built");
		return false;
	}
	return true;
}

/* Call the item's action (dry: with DryRun=true). */
static void cleanup_act(struct cleanup *c, bool dry)
{
	const struct cleanup_kind *k = c->kind;
	struct aws_param p[4];
	size_t n = 0;
	char snap[256];

	p[n++] = (struct aws_param){ k->action_id, c->resource_id };
	if (strcmp(k->action, "ModifyVolume") == 0)
		p[n++] = (struct aws_param){ "VolumeType", "gp3" };
	if (k->final_snapshot && !dry) {
		char ts[32];
		time_t now = time(NULL);
		struct tm tm;

		gmtime_r(&now, &tm);
		strftime(ts, sizeof(ts), "%Y%m%d%H%M%S", &tm);
		snprintf(snap, sizeof(snap), "cloudsweep-final-%.200s-%s", c->resource_id, ts);
		c->snapshot_id = http_strndup(c->op.req, snap, strlen(snap));
		p[n++] = (struct aws_param){ "FinalDBSnapshotIdentifier", c->snapshot_id };
	}
	if (dry)
		p[n++] = (struct aws_param){ "DryRun", "true" };
	c->op.state = dry ? CLEANUP_DRY : CLEANUP_ACTION;
	(void)cleanup_call(c, k->service, k->action, p, n, true);
}

/* Whether node carries the protection tag (EC2 tagSet or RDS TagList). */
static bool cleanup_protected(const struct cleanup *c, const struct aws_xml_node *node)
{
	const struct aws_xml_node *set = aws_xml_child(node, "tagSet");

	if (set != NULL) {
		AWS_XML_FOREACH(it, set, "item")
		{
			const char *key = aws_xml_text(it, "key");

			if (key != NULL && strcmp(key, c->protect_tag) == 0)
				return true;
		}
	}
	set = aws_xml_child(node, "TagList");
	if (set != NULL) {
		AWS_XML_FOREACH(it, set, "Tag")
		{
			const char *key = aws_xml_text(it, "Key");

			if (key != NULL && strcmp(key, c->protect_tag) == 0)
				return true;
		}
	}
	return false;
}

static bool cleanup_is(const char *v, const char *want)
{
	return v != NULL && strcmp(v, want) == 0;
}

/*
 * What changed about the resource since the finding, or NULL when nothing
 * did; msg receives the explanation.
 */
static const char *cleanup_changed(struct cleanup *c, const struct aws_xml_node *node, char *msg,
                                   size_t len)
{
	const char *t = c->type, *v;

	if (node == NULL) {
		snprintf(msg, len, "%s no longer exists", c->resource_id);
		return "gone";
	}
	if (cleanup_protected(c, node)) {
		snprintf(msg, len, "%s now carries the protection tag %s", c->resource_id,
		         c->protect_tag);
		return "protected";
	}
	if (strcmp(t, "ebs_unattached") == 0) {
		v = aws_xml_text(node, "status");
		if (aws_xml_find(node, "attachmentSet/item") != NULL ||
		    !cleanup_is(v, "available")) {
			snprintf(msg, len, "volume %s is attached (state %s)", c->resource_id,
			         v ? v : "unknown");
			return "attached";
		}
	} else if (strcmp(t, "ebs_gp2_to_gp3") == 0) {
		v = aws_xml_text(node, "volumeType");
		if (!cleanup_is(v, "gp2")) {
			snprintf(msg, len, "volume %s is now of type %s", c->resource_id,
			         v ? v : "unknown");
			return "volume_type";
		}
	} else if (strcmp(t, "eip_unassociated") == 0) {
		v = aws_xml_text(node, "associationId");
		if (v != NULL && v[0] != '\0') {
			snprintf(msg, len, "address %s is associated (%s)", c->resource_id, v);
			return "associated";
		}
	} else if (strcmp(t, "eni_unattached") == 0) {
		v = aws_xml_text(node, "status");
		if (aws_xml_child(node, "attachment") != NULL || cleanup_is(v, "in-use")) {
			snprintf(msg, len, "network interface %s is attached", c->resource_id);
			return "attached";
		}
	} else if (strcmp(t, "nat_gateway_idle") == 0) {
		v = aws_xml_text(node, "state");
		if (cleanup_is(v, "deleted") || cleanup_is(v, "deleting")) {
			snprintf(msg, len, "NAT gateway %s is %s", c->resource_id, v);
			return "gone";
		}
	} else if (strcmp(t, "ec2_idle") == 0) {
		v = aws_xml_text(node, "instanceState/name");
		if (!cleanup_is(v, "running")) {
			snprintf(msg, len, "instance %s is %s", c->resource_id, v ? v : "unknown");
			return "state";
		}
	} else if (strcmp(t, "rds_idle") == 0 || strcmp(t, "rds_stopped") == 0) {
		const char *want = strcmp(t, "rds_idle") == 0 ? "available" : "stopped";

		v = aws_xml_text(node, "DBInstanceStatus");
		if (!cleanup_is(v, want)) {
			snprintf(msg, len, "database %s is %s", c->resource_id, v ? v : "unknown");
			return "state";
		}
	}
	return NULL;
}

/* AWS error codes that mean the resource is gone. */
static bool cleanup_not_found(const char *code)
{
	return strstr(code, "NotFound") != NULL;
}

/* A description of a failed AWS answer into c->aws_code / c->message. */
static void cleanup_aws_error(struct cleanup *c, const struct aws_result *ar)
{
	snprintf(c->aws_code, sizeof(c->aws_code), "%s",
	         ar->error_code[0] != '\0' ? ar->error_code : aws_status_name(ar->status));
	snprintf(c->message, sizeof(c->message), "%s: %s", c->aws_code, ar->message);
}

/* Store the action's outcome: BEGIN, UPDATE, audit, COMMIT. */
static void cleanup_store(struct cleanup *c)
{
	c->op.state = CLEANUP_BEGIN;
	(void)http_op_begin(&c->op);
}

static void cleanup_advance(struct cleanup *c, enum cleanup_event ev, enum db_event dbev,
                            const PGresult *res, const struct aws_result *ar)
{
	struct http_op *op = &c->op;
	struct http_request *req = op->req;
	const char *id = c->cur < c->nids ? c->ids[c->cur] : NULL;

	if (ev == CLEANUP_EV_DB && dbev != DB_OK) {
		http_op_db_fail(op, dbev, res);
		return;
	}
	switch ((enum cleanup_state)op->state) {
	case CLEANUP_QUOTA: {
		long long used = atoll(PQgetvalue(res, 0, 0));
		long long cap = scan_g.cfg->cleanup_max_items_per_day;

		if (used + (long long)c->nids > cap) {
			http_op_fail(
			    op, 429, "cleanup_daily_limit",
			    "the organization may clean up %lld items per day; %lld done in "
			    "the last 24 hours",
			    cap, used);
			return;
		}
		cleanup_next(c);
		return;
	}
	case CLEANUP_READ: {
		const char *status, *grace;
		size_t i;

		if (PQntuples(res) != 1) {
			cleanup_item_error(c, 404, "not_found", "no such waste item");
			return;
		}
		status = PQgetvalue(res, 0, 4);
		if (strcmp(status, "approved") != 0) {
			char msg[96];

			snprintf(msg, sizeof(msg),
			         "only approved items can be cleaned; the item is %s", status);
			cleanup_item_error(c, 409, "conflict", msg);
			return;
		}
		if (!PQgetisnull(res, 0, 6)) {
			char msg[160];

			grace = PQgetvalue(res, 0, 6);
			snprintf(msg, sizeof(msg), "the item is in its grace period until %s",
			         grace);
			cleanup_item_error(c, 409, "grace_period", msg);
			return;
		}
		c->type = http_strndup(req, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0));
		c->resource_id =
		    http_strndup(req, PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1));
		c->region =
		    http_strndup(req, PQgetvalue(res, 0, 2), (size_t)PQgetlength(res, 0, 2));
		c->account_uuid =
		    http_strndup(req, PQgetvalue(res, 0, 3), (size_t)PQgetlength(res, 0, 3));
		c->protect_tag =
		    PQgetisnull(res, 0, 5)
		        ? CLEANUP_PROTECT_TAG
		        : http_strndup(req, PQgetvalue(res, 0, 5), (size_t)PQgetlength(res, 0, 5));
		c->kind = NULL;
		for (i = 0; i < CS_ARRAY_LEN(cleanup_kinds); i++)
			if (strcmp(cleanup_kinds[i].type, c->type) == 0)
				c->kind = &cleanup_kinds[i];
		if (c->kind != NULL && c->kind->service == AWS_ELBV2 &&
		    strncmp(c->resource_id, "arn:", 4) != 0)
			c->kind = &cleanup_kind_clb;
		if (c->kind == NULL) {
			cleanup_item_error(c, 409, "unsupported",
			                   "no cleanup action for this type");
			return;
		}
		{
			char purpose[64];

			snprintf(purpose, sizeof(purpose), "cleanup:%s", id);
			c->purpose = http_strndup(req, purpose, strlen(purpose));
		}
		op->state = CLEANUP_SESSION;
		c->aws_code[0] = c->message[0] = '\0';
		c->snapshot_id = NULL;
		c->session = scan_session_start(scan_g.pool, req->auth.org_id, c->account_uuid,
		                                c->purpose, c->region, cleanup_session_cb, c);
		if (c->session == NULL)
			cleanup_item_error(c, 503, "unavailable", "credentials are unavailable");
		return;
	}
	case CLEANUP_SESSION: {
		struct aws_param p[1] = { { c->kind->describe_id, c->resource_id } };

		if (c->creds == NULL) {
			char msg[CLEANUP_MSG_MAX + 64];

			snprintf(msg, sizeof(msg), "no credentials for the account: %s",
			         c->message);
			if (strcmp(c->aws_code, "account_not_found") == 0)
				cleanup_item_error(c, 409, "account_not_found", msg);
			else if (strcmp(c->aws_code, "unavailable") == 0)
				cleanup_item_error(c, 503, "unavailable", msg);
			else if (strcmp(c->aws_code, "credentials_error") == 0 ||
			         strcmp(c->aws_code, "no_base_credentials") == 0)
				cleanup_item_error(c, 500, "internal", msg);
			else
				cleanup_item_error(c, 502, "aws_error", msg);
			return;
		}
		op->state = CLEANUP_DESCRIBE;
		(void)cleanup_call(c, c->kind->service, c->kind->describe, p, 1, false);
		return;
	}
	case CLEANUP_DESCRIBE: {
		const char *what;
		char msg[CLEANUP_MSG_MAX];

		if (ar->status != AWS_OK &&
		    !(ar->status == AWS_ERR_SERVICE && cleanup_not_found(ar->error_code))) {
			char m[CLEANUP_MSG_MAX + 160];

			cleanup_aws_error(c, ar);
			snprintf(m, sizeof(m), "the resource could not be re-read: %s", c->message);
			cleanup_item_error(c, 502, "aws_error", m);
			return;
		}
		what = cleanup_changed(
		    c, ar->status == AWS_OK ? aws_xml_find(ar->xml, c->kind->node) : NULL, msg,
		    sizeof(msg));
		if (what != NULL) {
			const char *p[4] = { id, req->auth.org_id, what, msg };

			snprintf(c->aws_code, sizeof(c->aws_code), "%s", what);
			snprintf(c->message, sizeof(c->message), "%s", msg);
			op->state = CLEANUP_REFUSE;
			(void)http_op_query(
			    op,
			    "UPDATE waste_items SET status = 'open', approved_by = NULL, "
			    "approved_at = "
			    "NULL, outcome = jsonb_build_object('result', 'refused', 'reason', "
			    "'resource_changed', 'changed', $3::text, 'message', $4::text, "
			    "'checked_at', audit_rfc3339(now())) WHERE id = $1::uuid AND org_id = "
			    "$2::uuid AND status = 'approved'",
			    4, p);
			return;
		}
		if (c->dry_run) {
			if (!c->kind->dry_run) {
				cleanup_item_done(
				    c, json_pack(
				           "{s:s, s:b, s:b, s:s, s:s, s:b}", "id", id, "ok", 1,
				           "would_succeed", 1, "action", c->kind->action, "message",
				           "the resource is unchanged; this API has no DryRun, "
				           "so permissions were not checked",
				           "dry_run_checked", 0));
				return;
			}
			cleanup_act(c, true);
			return;
		}
		{
			/*
			 * Claim the item before the first change in AWS, so two requests
			 * never act on it at once, within the organization's daily cap
			 * (cleanup_claim in sql/012 holds it across racing requests).
			 */
			char cap[24];
			const char *p[4] = { id, req->auth.org_id, req->auth.user_id, cap };

			snprintf(cap, sizeof(cap), "%lld", scan_g.cfg->cleanup_max_items_per_day);
			op->state = CLEANUP_CLAIM;
			(void)http_op_query(
			    op, "SELECT cleanup_claim($1::uuid, $2::uuid, $3, $4::int)", 4, p);
		}
		return;
	}
	case CLEANUP_CLAIM:
		if (PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "limit") == 0) {
			char msg[128];

			snprintf(msg, sizeof(msg),
			         "the organization may clean up %lld items per day",
			         scan_g.cfg->cleanup_max_items_per_day);
			cleanup_item_error(c, 429, "cleanup_daily_limit", msg);
			return;
		}
		if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "claimed") != 0) {
			cleanup_item_error(c, 409, "conflict",
			                   "a cleanup of this item is already in progress");
			return;
		}
		if (c->kind->snapshot_first) {
			struct aws_param p[5] = {
				{ "VolumeId", c->resource_id },
				{ "Description", c->purpose },
				{ "TagSpecification.1.ResourceType", "snapshot" },
				{ "TagSpecification.1.Tag.1.Key", "cloudsweep:cleanup-of" },
				{ "TagSpecification.1.Tag.1.Value", c->resource_id },
			};

			op->state = CLEANUP_SNAPSHOT;
			(void)cleanup_call(c, AWS_EC2, "CreateSnapshot", p, 5, true);
			return;
		}
		cleanup_act(c, false);
		return;
	case CLEANUP_REFUSE: {
		char m[CLEANUP_MSG_MAX + 160];

		snprintf(m, sizeof(m), "the resource changed since the finding (%s): %s",
		         c->aws_code, c->message);
		cleanup_item_done(c,
		                  json_pack("{s:s, s:b, s:i, s:{s:s, s:s}, s:s}", "id", id, "ok", 0,
		                            "http_status", 409, "error", "code", "resource_changed",
		                            "message", m, "changed", c->aws_code));
		return;
	}
	case CLEANUP_DRY: {
		bool ok = ar->status == AWS_OK || (ar->status == AWS_ERR_SERVICE &&
		                                   strcmp(ar->error_code, "DryRunOperation") == 0);

		if (!ok)
			cleanup_aws_error(c, ar);
		cleanup_item_done(c, json_pack("{s:s, s:b, s:b, s:s, s:s, s:b}", "id", id, "ok", 1,
		                               "would_succeed", ok, "action", c->kind->action,
		                               "message", ok ? ar->message : c->message,
		                               "dry_run_checked", 1));
		return;
	}
	case CLEANUP_SNAPSHOT: {
		const char *snap =
		    ar->status == AWS_OK ? aws_xml_text(ar->xml, "snapshotId") : NULL;

		if (snap == NULL || snap[0] == '\0') {
			/* No snapshot, no delete: the item fails with AWS's answer. */
			if (ar->status == AWS_OK)
				snprintf(c->message, sizeof(c->message),
				         "CreateSnapshot returned no id");
			else
				cleanup_aws_error(c, ar);
			snprintf(c->request_id, sizeof(c->request_id), "%s", ar->request_id);
			snprintf(c->result_status, sizeof(c->result_status), "failed");
			cleanup_store(c);
			return;
		}
		c->snapshot_id = http_strndup(req, snap, strlen(snap));
		{
			const char *p[3] = { id, req->auth.org_id, c->snapshot_id };

			op->state = CLEANUP_SNAPSAVE;
			(void)http_op_query(
			    op,
			    "UPDATE waste_items SET outcome = coalesce(outcome, '{}') || "
			    "jsonb_build_object('snapshot_id', $3::text) WHERE id = $1::uuid AND "
			    "org_id = "
			    "$2::uuid AND status = 'approved'",
			    3, p);
		}
		return;
	}
	case CLEANUP_SNAPSAVE:
		cleanup_act(c, false);
		return;
	case CLEANUP_ACTION:
		snprintf(c->request_id, sizeof(c->request_id), "%s", ar->request_id);
		if (ar->status == AWS_OK) {
			snprintf(c->result_status, sizeof(c->result_status), "cleaned");
			snprintf(c->message, sizeof(c->message), "%s done", c->kind->action);
		} else {
			snprintf(c->result_status, sizeof(c->result_status), "failed");
			cleanup_aws_error(c, ar);
		}
		cleanup_store(c);
		return;
	case CLEANUP_BEGIN: {
		const char *p[9] = { id,
			             req->auth.org_id,
			             c->result_status,
			             c->kind->action,
			             c->message,
			             c->aws_code[0] ? c->aws_code : NULL,
			             c->request_id[0] ? c->request_id : NULL,
			             c->snapshot_id,
			             req->auth.user_id };

		op->state = CLEANUP_STORE;
		(void)http_op_query(
		    op,
		    "UPDATE waste_items w SET status = $3, aws_request_id = $7, cleaned_at = CASE "
		    "WHEN $3 = 'cleaned' THEN now() END, outcome = jsonb_strip_nulls("
		    "jsonb_build_object('result', $3::text, 'action', $4::text, 'message', "
		    "$5::text, "
		    "'error_code', $6::text, 'snapshot_id', $8::text, 'by', $9::text, "
		    "'attempted_at', audit_rfc3339(now()))) WHERE w.id = $1::uuid AND w.org_id = "
		    "$2::uuid AND w.status = 'approved' RETURNING " SCAN_ITEM_JSON_SQL "::text",
		    9, p);
		return;
	}
	case CLEANUP_STORE: {
		struct audit_event aev;
		json_t *details, *item;
		json_error_t jerr;

		if (PQntuples(res) != 1) {
			http_op_fail(op, 409, "conflict",
			             "the item changed while it was cleaned up");
			return;
		}
		item = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
		if (item == NULL) {
			http_op_fail(op, 500, "internal", "bad item document");
			return;
		}
		if (json_array_append_new(c->results,
		                          json_pack("{s:s, s:b, s:o}", "id", id, "ok",
		                                    strcmp(c->result_status, "cleaned") == 0,
		                                    "item", item)) != 0) {
			http_op_fail(op, 500, "internal", "out of memory");
			return;
		}
		op->state = CLEANUP_AUDIT;
		scan_audit_fill(&aev, req, "waste_item.cleaned", id);
		if (strcmp(c->result_status, "cleaned") != 0)
			aev.result = AUDIT_ERROR;
		details =
		    json_pack("{s:s, s:s, s:s, s:s, s:s, s:s?, s:s?, s:s?}", "type", c->type,
		              "resource_id", c->resource_id, "region", c->region, "action",
		              c->kind->action, "result", c->result_status, "aws_request_id",
		              c->request_id[0] ? c->request_id : NULL, "error_code",
		              c->aws_code[0] ? c->aws_code : NULL, "snapshot_id", c->snapshot_id);
		(void)audit_op_write(op, &aev, details);
		return;
	}
	case CLEANUP_AUDIT:
		op->state = CLEANUP_COMMIT;
		http_op_commit(op);
		return;
	case CLEANUP_COMMIT:
		cleanup_release(c);
		c->cur++;
		cleanup_next(c);
		return;
	}
}

/* Start the next item, or answer when every item is done. */
static void cleanup_next(struct cleanup *c)
{
	struct http_request *req = c->op.req;

	if (c->cur < c->nids) {
		char grace[24];
		const char *p[3] = { c->ids[c->cur], req->auth.org_id, grace };

		snprintf(grace, sizeof(grace), "%lld", scan_g.cfg->cleanup_grace_days);
		c->op.state = CLEANUP_READ;
		(void)http_op_query(
		    &c->op,
		    "SELECT w.type, w.resource_id, w.region, w.aws_account_id, w.status, "
		    "nullif(s.settings->>'protect_tag', ''), CASE WHEN $3::int > 0 AND "
		    "w.approved_at "
		    "+ make_interval(days => $3::int) > now() THEN audit_rfc3339(w.approved_at + "
		    "make_interval(days => $3::int)) END FROM waste_items w LEFT JOIN scans s ON "
		    "s.id = w.scan_id WHERE w.id = $1::uuid AND w.org_id = $2::uuid",
		    3, p);
		return;
	}
	http_set_cancel(req, NULL, NULL);
	if (c->batch) {
		json_t *doc = json_pack("{s:b, s:O}", "dry_run", c->dry_run, "results", c->results);

		json_decref(c->results);
		c->results = NULL;
		http_respond_json(req, 200, doc);
		return;
	}
	{
		json_t *r = json_array_get(c->results, 0), *err = json_object_get(r, "error");

		if (err != NULL) {
			json_int_t st = json_integer_value(json_object_get(r, "http_status"));

			http_error(req, (int)st, json_string_value(json_object_get(err, "code")),
			           "%s", json_string_value(json_object_get(err, "message")));
		} else if (c->dry_run) {
			json_object_del(r, "ok");
			(void)json_object_set_new(r, "dry_run", json_true());
			http_respond_json(req, 200, json_incref(r));
		} else {
			http_respond_json(req, 200, json_incref(json_object_get(r, "item")));
		}
		json_decref(c->results);
		c->results = NULL;
	}
}

/*
 * Check {dry_run} (and, for the batch, ids) of body; the ids are copied into
 * the request's pool. false has answered 400 or 409.
 */
static bool cleanup_parse(struct http_request *req, bool batch, const json_t *body, bool *dry_run,
                          const char ***idsp, size_t *nids)
{
	const json_t *dry = body != NULL ? json_object_get(body, "dry_run") : NULL, *ids;
	size_t i, j, n;

	if (body != NULL && !json_is_object(body)) {
		http_error(req, 400, "invalid_request", "the body must be a JSON object");
		return false;
	}
	if (dry != NULL && !json_is_boolean(dry)) {
		http_error(req, 400, "invalid_request", "dry_run must be a boolean");
		return false;
	}
	*dry_run = json_is_true(dry);
	if (!batch) {
		*idsp = http_alloc(req, sizeof(**idsp));
		(*idsp)[0] = http_param(req, "id");
		*nids = 1;
		return true;
	}
	ids = json_object_get(body, "ids");
	if (!json_is_array(ids) || json_array_size(ids) == 0) {
		http_error(req, 400, "invalid_request", "ids must be a non-empty array");
		return false;
	}
	n = json_array_size(ids);
	if ((long long)n > scan_g.cfg->cleanup_max_items_per_request) {
		http_error(req, 409, "cleanup_batch_too_large",
		           "a cleanup request may act on at most %lld items",
		           scan_g.cfg->cleanup_max_items_per_request);
		return false;
	}
	*idsp = http_alloc(req, n * sizeof(**idsp));
	for (i = 0; i < n; i++) {
		const char *s = json_string_value(json_array_get(ids, i));

		if (s == NULL || !cs_uuid_valid(s)) {
			http_error(req, 400, "invalid_request", "ids[%zu] is not a UUID", i);
			return false;
		}
		for (j = 0; j < i; j++)
			if (strcasecmp((*idsp)[j], s) == 0) {
				http_error(req, 400, "invalid_request", "ids[%zu] is repeated", i);
				return false;
			}
		(*idsp)[i] = http_strndup(req, s, strlen(s));
	}
	*nids = n;
	return true;
}

/* The request's op from its body; NULL has answered. */
static struct cleanup *cleanup_new(struct http_request *req, bool batch)
{
	json_t *body = NULL, *results;
	const char **ids = NULL;
	size_t nids = 0;
	bool dry_run = false, ok;
	struct cleanup *c;

	if (req->body_len > 0 || batch) {
		body = http_json_body(req);
		if (body == NULL)
			return NULL;
	}
	ok = cleanup_parse(req, batch, body, &dry_run, &ids, &nids);
	json_decref(body);
	if (!ok)
		return NULL;
	results = json_array();
	if (results == NULL) {
		http_error(req, 500, "internal", "out of memory");
		return NULL;
	}
	c = http_op_new(req, sizeof(*c), cleanup_db_cb);
	c->op.on_cancel = cleanup_on_cancel;
	c->batch = batch;
	c->dry_run = dry_run;
	c->ids = ids;
	c->nids = nids;
	c->results = results;
	return c;
}

/* Start: the daily cap first for real runs, then the items. */
static void cleanup_start(struct cleanup *c)
{
	struct http_request *req = c->op.req;

	if (c->dry_run) {
		cleanup_next(c);
		return;
	}
	{
		const char *p[1] = { req->auth.org_id };

		c->op.state = CLEANUP_QUOTA;
		(void)http_op_query(&c->op,
		                    "SELECT count(*) FROM waste_items WHERE org_id = $1::uuid AND "
		                    "outcome ? 'attempted_at' AND (outcome->>'attempted_at')::"
		                    "timestamptz > now() - interval '1 day'",
		                    1, p);
	}
}

static void cleanup_one(struct http_request *req)
{
	struct cleanup *c;

	if (!cs_uuid_valid(http_param(req, "id"))) {
		http_error(req, 404, "not_found", "no such waste item");
		return;
	}
	c = cleanup_new(req, false);
	if (c != NULL)
		cleanup_start(c);
}

static void cleanup_batch(struct http_request *req)
{
	struct cleanup *c = cleanup_new(req, true);

	if (c != NULL)
		cleanup_start(c);
}

/* ---- mark-then-act: tag the resource at approval ---- */

enum cleanup_mark_state {
	CLEANUP_MARK_SESSION, /* waiting for credentials */
	CLEANUP_MARK_TAG,     /* CreateTags sent */
};

struct cleanup_mark {
	struct http_request *req; /* borrowed; answered when the tag is set */
	enum cleanup_mark_state state;
	json_t *doc;                         /* owned; the approved item */
	const char *resource_id, *region;    /* pool-owned */
	char value[16];                      /* the tag's date */
	struct scan_session *session;        /* pending, or NULL */
	struct aws_owned_credentials *creds; /* owned, or NULL */
	struct aws_call *call;               /* pending, or NULL */
};

static void cleanup_mark_aws_cb(const struct aws_result *res, void *arg);

static void cleanup_mark_release(struct cleanup_mark *m)
{
	if (m->session != NULL)
		scan_session_cancel(m->session);
	m->session = NULL;
	if (m->call != NULL)
		aws_call_cancel(m->call);
	m->call = NULL;
	if (m->creds != NULL) {
		aws_owned_credentials_clear(m->creds);
		free(m->creds);
	}
	m->creds = NULL;
}

static void cleanup_mark_cancel_cb(struct http_request *req, void *arg)
{
	struct cleanup_mark *m = arg;

	(void)req;
	cleanup_mark_release(m);
	json_decref(m->doc);
	m->doc = NULL;
}

/* Answer the approval with the item and how the marking went. */
static void cleanup_mark_finish(struct cleanup_mark *m, bool ok, const char *message)
{
	json_t *doc = m->doc;

	cleanup_mark_release(m);
	m->doc = NULL;
	http_set_cancel(m->req, NULL, NULL);
	(void)json_object_set_new(doc, "marked_for_deletion",
	                          json_pack("{s:s, s:s, s:b, s:s}", "tag", CLEANUP_MARK_KEY,
	                                    "value", m->value, "ok", ok, "message", message));
	http_respond_json(m->req, 200, doc);
}

static void cleanup_mark_advance(struct cleanup_mark *m, const char *error_message,
                                 const struct aws_result *ar)
{
	switch (m->state) {
	case CLEANUP_MARK_SESSION: {
		struct aws_param p[3] = { { "ResourceId.1", m->resource_id },
			                  { "Tag.1.Key", CLEANUP_MARK_KEY },
			                  { "Tag.1.Value", m->value } };
		struct aws_credentials view;
		struct aws_request rq = { 0 };

		if (m->creds == NULL) {
			cleanup_mark_finish(m, false,
			                    error_message ? error_message : "no credentials");
			return;
		}
		view = aws_owned_credentials_view(m->creds);
		rq.service = AWS_EC2;
		rq.region = m->region;
		rq.creds = &view;
		rq.action = "CreateTags";
		rq.params = p;
		rq.nparams = 3;
		rq.mutating = true;
		m->state = CLEANUP_MARK_TAG;
		if (aws_worker_client() != NULL)
			m->call = aws_call(aws_worker_client(), &rq, cleanup_mark_aws_cb, m);
		if (m->call == NULL)
			cleanup_mark_finish(m, false, "the AWS request could not be built");
		return;
	}
	case CLEANUP_MARK_TAG: {
		char msg[CLEANUP_MSG_MAX];

		if (ar->status == AWS_OK) {
			cleanup_mark_finish(m, true, "tagged");
			return;
		}
		snprintf(msg, sizeof(msg), "%s: %s",
		         ar->error_code[0] != '\0' ? ar->error_code : aws_status_name(ar->status),
		         ar->message);
		cleanup_mark_finish(m, false, msg);
		return;
	}
	}
}

static void cleanup_mark_session_cb(void *arg, int status, const char *error_code,
                                    const char *error_message, struct aws_owned_credentials *creds)
{
	struct cleanup_mark *m = arg;

	(void)status;
	(void)error_code;
	m->session = NULL;
	m->creds = creds;
	cleanup_mark_advance(m, error_message, NULL);
}

static void cleanup_mark_aws_cb(const struct aws_result *res, void *arg)
{
	struct cleanup_mark *m = arg;

	m->call = NULL;
	cleanup_mark_advance(m, NULL, res);
}

/* Whether approvals tag resources (cleanup_grace_days > 0). */
bool scan_cleanup_marks(void)
{
	return scan_g.cfg->cleanup_grace_days > 0;
}

/* Tag the approved item's resource for mark-then-act, then answer the approval. */
void scan_cleanup_mark(struct http_request *req, const char *doc, const char *item_id,
                       const char *type, const char *resource_id, const char *region,
                       const char *account_uuid)
{
	struct cleanup_mark *m;
	json_error_t jerr;
	const struct cleanup_kind *k = NULL;
	char purpose[64];
	time_t when = time(NULL) + (time_t)scan_g.cfg->cleanup_grace_days * 86400;
	struct tm tm;
	size_t i;

	for (i = 0; i < CS_ARRAY_LEN(cleanup_kinds); i++)
		if (strcmp(cleanup_kinds[i].type, type) == 0)
			k = &cleanup_kinds[i];
	m = http_alloc(req, sizeof(*m));
	memset(m, 0, sizeof(*m));
	m->req = req;
	m->doc = json_loads(doc, 0, &jerr);
	if (m->doc == NULL) {
		http_error(req, 500, "internal", "bad item document");
		return;
	}
	gmtime_r(&when, &tm);
	strftime(m->value, sizeof(m->value), "%Y-%m-%d", &tm);
	m->resource_id = resource_id;
	m->region = region;
	http_set_cancel(req, cleanup_mark_cancel_cb, m);
	if (k == NULL || k->service != AWS_EC2) {
		cleanup_mark_finish(m, false,
		                    "this resource type cannot be tagged; the grace "
		                    "period still applies");
		return;
	}
	snprintf(purpose, sizeof(purpose), "cleanup:%s", item_id);
	m->state = CLEANUP_MARK_SESSION;
	m->session = scan_session_start(scan_g.pool, req->auth.org_id, account_uuid, purpose,
	                                region, cleanup_mark_session_cb, m);
	if (m->session == NULL)
		cleanup_mark_finish(m, false, "credentials are unavailable");
}

/* Register the cleanup routes (called from scan_items_routes). */
void scan_cleanup_routes(struct router *r)
{
	router_add_perm(r, "POST", "/api/v1/waste-items/{id}/cleanup", cleanup_one, ROUTE_NEEDS_DB,
	                "waste_items:cleanup");
	router_add_perm(r, "POST", "/api/v1/waste-items/cleanup", cleanup_batch, ROUTE_NEEDS_DB,
	                "waste_items:cleanup");
}
