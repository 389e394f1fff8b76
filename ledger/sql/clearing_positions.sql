-- Each region's net position: owed to it (as treatment region) minus owed by it (as insured region).
WITH m AS (
  SELECT insured_region, treatment_region, SUM(fund_fen) AS owed_fen
  FROM settlements
  WHERE clearing_type = 'cross-region' AND business_date // 100 = ${month}
  GROUP BY ALL
)
SELECT region, SUM(amount)::BIGINT AS net_position_fen
FROM (SELECT treatment_region AS region, owed_fen AS amount FROM m
      UNION ALL SELECT insured_region AS region, -owed_fen AS amount FROM m)
GROUP BY region
ORDER BY region;
