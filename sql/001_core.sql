-- 001_core: shared definitions later migrations build on. Migrations are
-- applied in order, each in one transaction, and recorded in
-- schema_migrations by `cloudsweepd migrate`.

-- Keeps updated_at honest on every table that has one.
CREATE OR REPLACE FUNCTION cs_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
