-- 对总账 from the journal scan's groups (ledger/_totals.pyx sums the settlements of the date range
-- per insurance type, insured region and local / cross-region, exactly as settlements.sql + totals.sql
-- select and sign them): one row per group, ordered and typed as totals.sql answers.
SELECT ins_type, clearing_type, clearing_agency,
       SUM(medical_total_fen)::BIGINT AS medical_total_fen,
       SUM(fund_fen)::BIGINT AS fund_fen,
       SUM(insurance_account_fen)::BIGINT AS insurance_account_fen,
       SUM(financial_account_fen)::BIGINT AS financial_account_fen,
       SUM(settlement_count)::BIGINT AS settlement_count
FROM totals_groups
GROUP BY ALL
ORDER BY ALL;
