-- Drops the OpenTelemetry ingestion functions; the spans they stored stay.

DROP FUNCTION sessiontag.ingest_otlp(jsonb, uuid);
DROP FUNCTION sessiontag._otlp_time(jsonb);
DROP FUNCTION sessiontag._otlp_attributes(jsonb);
