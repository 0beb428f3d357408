/*
 * xml.c - AWS query-protocol responses parsed with expat into a small
 * read-only DOM. Nodes and text live in one bump arena per document, so a
 * document is freed in a few free() calls however large it is. The input is
 * untrusted (an endpoint override may point anywhere): DOCTYPEs and entity
 * declarations are refused outright, depth and element count are bounded,
 * and the arena never holds more than the input's size plus the nodes.
 */
#include "config.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <expat.h>

#include "cloudsweep/aws.h"
#include "cloudsweep/util.h"

#define XML_ARENA_CHUNK 65536

/* A chunk of the arena; data follows the header. */
struct xml_chunk {
	struct xml_chunk *next; /* owned */
	size_t used, cap;
	max_align_t data[];
};

struct xml_node {
	struct aws_xml_node pub; /* first: the public view */
	struct xml_node *last;   /* borrowed; last child, for appending */
	size_t text_start;       /* where this element's text begins in the scratch buffer */
};

struct aws_xml_doc {
	struct xml_chunk *chunks; /* owned list, newest first */
	struct xml_node *root;    /* in the arena */
};

/* Parse state; lives on aws_xml_parse's stack. */
struct xml_parse {
	XML_Parser p;
	struct aws_xml_doc *doc;
	struct xml_node *cur; /* innermost open element */
	int depth;
	size_t nodes;
	char *text; /* owned scratch: character data of the open elements */
	size_t text_len, text_cap;
	const char *fail; /* why the parse was stopped, or NULL */
};

static void *xml_alloc(struct aws_xml_doc *doc, size_t n)
{
	struct xml_chunk *c = doc->chunks;
	size_t align = sizeof(max_align_t);

	n = (n + align - 1) / align * align;
	if (c == NULL || c->cap - c->used < n) {
		size_t cap = n > XML_ARENA_CHUNK ? n : XML_ARENA_CHUNK;

		c = malloc(sizeof(*c) + cap);
		if (c == NULL)
			return NULL;
		c->used = 0;
		c->cap = cap;
		c->next = doc->chunks;
		doc->chunks = c;
	}
	c->used += n;
	return (char *)c->data + c->used - n;
}

static void xml_stop(struct xml_parse *x, const char *why)
{
	if (x->fail == NULL)
		x->fail = why;
	XML_StopParser(x->p, XML_FALSE);
}

/* The local part of an expat namespace-joined name "uri|local". */
static const char *xml_local(const char *name)
{
	const char *bar = strrchr(name, '|');

	return bar != NULL ? bar + 1 : name;
}

static void xml_start_cb(void *arg, const XML_Char *name, const XML_Char **attrs)
{
	struct xml_parse *x = arg;
	const char *local = xml_local(name);
	size_t nlen = strlen(local);
	struct xml_node *n;
	char *copy;

	(void)attrs;
	if (x->fail != NULL)
		return;
	if (++x->depth > AWS_XML_MAX_DEPTH) {
		xml_stop(x, "nested too deeply");
		return;
	}
	if (++x->nodes > AWS_XML_MAX_NODES) {
		xml_stop(x, "too many elements");
		return;
	}
	n = xml_alloc(x->doc, sizeof(*n));
	copy = xml_alloc(x->doc, nlen + 1);
	if (n == NULL || copy == NULL) {
		xml_stop(x, "out of memory");
		return;
	}
	memcpy(copy, local, nlen + 1);
	memset(n, 0, sizeof(*n));
	n->pub.name = copy;
	n->pub.text = "";
	n->text_start = x->text_len;
	if (x->cur == NULL) {
		x->doc->root = n;
	} else {
		n->pub.parent = &x->cur->pub;
		if (x->cur->last == NULL)
			x->cur->pub.child = &n->pub;
		else
			x->cur->last->pub.next = &n->pub;
		x->cur->last = n;
	}
	x->cur = n;
}

static void xml_end_cb(void *arg, const XML_Char *name)
{
	struct xml_parse *x = arg;
	struct xml_node *n = x->cur;
	const char *t;
	size_t len;

	(void)name;
	if (x->fail != NULL || n == NULL)
		return;
	/* No character data yet: no buffer either (and no arithmetic on NULL). */
	t = x->text != NULL ? x->text + n->text_start : "";
	len = x->text != NULL ? x->text_len - n->text_start : 0;
	if (n->pub.child != NULL) {
		while (len > 0 && isspace((unsigned char)*t)) {
			t++;
			len--;
		}
		while (len > 0 && isspace((unsigned char)t[len - 1]))
			len--;
	}
	if (len > 0) {
		char *copy = xml_alloc(x->doc, len + 1);

		if (copy == NULL) {
			xml_stop(x, "out of memory");
			return;
		}
		memcpy(copy, t, len);
		copy[len] = '\0';
		n->pub.text = copy;
		n->pub.text_len = len;
	}
	x->text_len = n->text_start; /* the parent's text resumes where this element began */
	x->cur = (struct xml_node *)(void *)n->pub.parent;
	x->depth--;
}

static void xml_text_cb(void *arg, const XML_Char *s, int len)
{
	struct xml_parse *x = arg;

	if (x->fail != NULL || x->cur == NULL || len <= 0)
		return;
	if (x->text_cap - x->text_len < (size_t)len) {
		size_t cap = x->text_cap ? x->text_cap : 4096;
		char *t;

		while (cap - x->text_len < (size_t)len)
			cap *= 2;
		/* Not realloc: the old buffer may hold secrets and must be wiped. */
		t = malloc(cap);
		if (t == NULL) {
			xml_stop(x, "out of memory");
			return;
		}
		if (x->text != NULL) {
			memcpy(t, x->text, x->text_len);
			cs_wipe(x->text, x->text_cap);
			free(x->text);
		}
		x->text = t;
		x->text_cap = cap;
	}
	memcpy(x->text + x->text_len, s, (size_t)len);
	x->text_len += (size_t)len;
}

static void xml_doctype_cb(void *arg, const XML_Char *name, const XML_Char *sysid,
                           const XML_Char *pubid, int has_internal)
{
	(void)name;
	(void)sysid;
	(void)pubid;
	(void)has_internal;
	xml_stop(arg, "a DOCTYPE is not allowed");
}

static void xml_entity_cb(void *arg, const XML_Char *name, int is_param, const XML_Char *value,
                          int value_len, const XML_Char *base, const XML_Char *sysid,
                          const XML_Char *pubid, const XML_Char *notation)
{
	(void)name;
	(void)is_param;
	(void)value;
	(void)value_len;
	(void)base;
	(void)sysid;
	(void)pubid;
	(void)notation;
	xml_stop(arg, "an entity declaration is not allowed");
}

struct aws_xml_doc *aws_xml_parse(const char *buf, size_t len, char *err, size_t errlen)
{
	struct xml_parse x = { 0 };
	enum XML_Status st;

	if (len > (size_t)INT32_MAX) {
		snprintf(err, errlen, "XML document too large");
		return NULL;
	}
	x.doc = calloc(1, sizeof(*x.doc));
	x.p = XML_ParserCreateNS("UTF-8", '|');
	if (x.doc == NULL || x.p == NULL) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	XML_SetUserData(x.p, &x);
	XML_SetElementHandler(x.p, xml_start_cb, xml_end_cb);
	XML_SetCharacterDataHandler(x.p, xml_text_cb);
	XML_SetStartDoctypeDeclHandler(x.p, xml_doctype_cb);
	XML_SetEntityDeclHandler(x.p, xml_entity_cb);
	st = XML_Parse(x.p, buf, (int)len, XML_TRUE);
	if (x.fail != NULL) {
		snprintf(err, errlen, "invalid XML: %s (line %lu)", x.fail,
		         (unsigned long)XML_GetCurrentLineNumber(x.p));
		goto fail;
	}
	if (st != XML_STATUS_OK || x.doc->root == NULL) {
		snprintf(err, errlen, "invalid XML: %s (line %lu, column %lu)",
		         XML_ErrorString(XML_GetErrorCode(x.p)),
		         (unsigned long)XML_GetCurrentLineNumber(x.p),
		         (unsigned long)XML_GetCurrentColumnNumber(x.p));
		goto fail;
	}
	XML_ParserFree(x.p);
	cs_wipe(x.text, x.text_cap);
	free(x.text);
	return x.doc;
fail:
	if (x.p != NULL)
		XML_ParserFree(x.p);
	cs_wipe(x.text, x.text_cap);
	free(x.text);
	aws_xml_free_secret(x.doc);
	return NULL;
}

static void xml_free(struct aws_xml_doc *doc, bool wipe)
{
	struct xml_chunk *c, *next;

	if (doc == NULL)
		return;
	for (c = doc->chunks; c != NULL; c = next) {
		next = c->next;
		if (wipe)
			cs_wipe(c->data, c->used);
		free(c);
	}
	free(doc);
}

void aws_xml_free(struct aws_xml_doc *doc)
{
	xml_free(doc, false);
}

void aws_xml_free_secret(struct aws_xml_doc *doc)
{
	xml_free(doc, true);
}

const struct aws_xml_node *aws_xml_root(const struct aws_xml_doc *doc)
{
	return doc != NULL && doc->root != NULL ? &doc->root->pub : NULL;
}

const struct aws_xml_node *aws_xml_child(const struct aws_xml_node *n, const char *name)
{
	if (n == NULL)
		return NULL;
	for (const struct aws_xml_node *c = n->child; c != NULL; c = c->next)
		if (strcmp(c->name, name) == 0)
			return c;
	return NULL;
}

const struct aws_xml_node *aws_xml_next(const struct aws_xml_node *n)
{
	if (n == NULL)
		return NULL;
	for (const struct aws_xml_node *c = n->next; c != NULL; c = c->next)
		if (strcmp(c->name, n->name) == 0)
			return c;
	return NULL;
}

const struct aws_xml_node *aws_xml_find(const struct aws_xml_node *n, const char *path)
{
	while (n != NULL && *path != '\0') {
		const char *slash = strchr(path, '/');
		size_t len = slash != NULL ? (size_t)(slash - path) : strlen(path);
		const struct aws_xml_node *c;

		for (c = n->child; c != NULL; c = c->next)
			if ((len == 1 && *path == '*') ||
			    (strncmp(c->name, path, len) == 0 && c->name[len] == '\0'))
				break;
		n = c;
		path += len;
		if (*path == '/')
			path++;
	}
	return n;
}

const char *aws_xml_text(const struct aws_xml_node *n, const char *path)
{
	const struct aws_xml_node *f = aws_xml_find(n, path);

	return f != NULL ? f->text : NULL;
}
