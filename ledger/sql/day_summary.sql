-- The day's volumes and amounts by command, and the response-code mix (for the report).
SELECT cmd, code, COUNT(*)::BIGINT AS messages, SUM(CASE WHEN posted AND NOT duplicate THEN amount_fen ELSE 0 END)::BIGINT AS amount_fen
FROM journal WHERE record_kind = 1 AND business_date = ${date} AND cmd BETWEEN 1 AND 11
GROUP BY ALL ORDER BY ALL;
