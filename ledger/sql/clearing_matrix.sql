-- 异地清算: the fund amounts the insured region owes the treatment region (whose fund paid the hospital).
SELECT insured_region, treatment_region, SUM(fund_fen)::BIGINT AS owed_fen, SUM(direction)::BIGINT AS settlement_count
FROM settlements
WHERE clearing_type = 'cross-region' AND business_date // 100 = ${month}
GROUP BY ALL
ORDER BY ALL;
