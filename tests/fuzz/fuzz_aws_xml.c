/*
 * fuzz_aws_xml.c - libFuzzer target for the AWS XML response parser: any
 * bytes must either parse into a DOM whose every node and text can be
 * walked, or be refused with a message; never crash, leak or recurse
 * without bound. Seeds live in tests/fuzz/corpus/fuzz_aws_xml.
 */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cloudsweep/aws.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Touch every node iteratively, the way response handlers walk lists. */
static size_t walk(const struct aws_xml_node *n)
{
	size_t sum = 0;

	while (n != NULL) {
		sum += strlen(n->name) + n->text_len;
		if (n->child != NULL) {
			n = n->child;
			continue;
		}
		while (n != NULL && n->next == NULL)
			n = n->parent;
		if (n != NULL)
			n = n->next;
	}
	return sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[256];
	struct aws_xml_doc *doc = aws_xml_parse((const char *)data, size, err, sizeof(err));
	const struct aws_xml_node *root = aws_xml_root(doc);
	volatile size_t sink = 0;

	if (doc == NULL)
		return 0;
	sink += walk(root);
	if (aws_xml_text(root, "Errors/Error/Code") != NULL)
		sink++;
	if (aws_xml_text(root, "*/Credentials/AccessKeyId") != NULL)
		sink++;
	AWS_XML_FOREACH(it, aws_xml_child(root, "volumeSet"), "item")
	sink++;
	(void)sink;
	aws_xml_free(doc);
	return 0;
}
