-- Messages per hour of the terminals' local time (field 12), for the report's chart.
SELECT local_time // 10000 AS hour, COUNT(*)::BIGINT AS messages
FROM journal WHERE record_kind = 1 AND business_date = ${date} AND cmd BETWEEN 1 AND 11
GROUP BY ALL ORDER BY ALL;
