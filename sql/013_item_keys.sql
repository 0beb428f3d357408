-- 013_item_keys: cheaper keys for waste items (a scan inserts thousands per unit).
--
-- Each item used to check three foreign keys (orgs, scans, scan_units) and
-- feed five indexes. The scans check locked the one row every unit of a scan
-- also updates (FOR KEY SHARE by each inserting transaction), and the unique
-- key spelled the unit out as (scan_id, aws_account_id, region).
--
-- Now an item names its unit, and one composite key ties the item's scan and
-- organization to that unit's: one check, on a row no other unit touches,
-- and stricter than before (an item can no longer claim another org's scan).
-- The unique key is (unit_id, type, resource_id), which also serves lookups
-- by unit, so waste_items_unit_idx goes. Deleting a unit (only through its
-- scan, organization or AWS account) deletes its items.
--
-- Items inserted from now on must name their unit (NOT VALID: older rows are
-- not re-checked). A NULL unit_id could only come from a unit deleted under
-- 010's ON DELETE SET NULL, and units were only ever deleted with their scan.

ALTER TABLE scan_units ADD CONSTRAINT scan_units_id_scan_org_key UNIQUE (id, scan_id, org_id);

ALTER TABLE waste_items
    DROP CONSTRAINT waste_items_org_id_fkey,
    DROP CONSTRAINT waste_items_scan_id_fkey,
    DROP CONSTRAINT waste_items_unit_id_fkey,
    DROP CONSTRAINT waste_items_scan_id_aws_account_id_region_type_resource_id_key;

ALTER TABLE waste_items
    ADD CONSTRAINT waste_items_unit_fk FOREIGN KEY (unit_id, scan_id, org_id)
        REFERENCES scan_units (id, scan_id, org_id) ON DELETE CASCADE,
    ADD CONSTRAINT waste_items_unit_resource_key UNIQUE (unit_id, type, resource_id),
    ADD CONSTRAINT waste_items_unit_required CHECK (unit_id IS NOT NULL) NOT VALID;

DROP INDEX waste_items_unit_idx;
