-- 对总账 against the counterpart's totals file: every group whose figures differ (or that only
-- one side has). Empty = balanced.
WITH theirs AS (
  SELECT * FROM read_csv('${file}', header = true, columns = {
    'ins_type': 'BIGINT', 'clearing_type': 'VARCHAR', 'clearing_agency': 'BIGINT',
    'medical_total_fen': 'BIGINT', 'fund_fen': 'BIGINT', 'insurance_account_fen': 'BIGINT',
    'financial_account_fen': 'BIGINT', 'settlement_count': 'BIGINT'})
)
SELECT COALESCE(o.ins_type, t.ins_type) AS ins_type,
       COALESCE(o.clearing_type, t.clearing_type) AS clearing_type,
       COALESCE(o.clearing_agency, t.clearing_agency) AS clearing_agency,
       o.medical_total_fen AS ours_medical_total_fen, t.medical_total_fen AS theirs_medical_total_fen,
       o.fund_fen AS ours_fund_fen, t.fund_fen AS theirs_fund_fen,
       o.insurance_account_fen AS ours_insurance_account_fen, t.insurance_account_fen AS theirs_insurance_account_fen,
       o.financial_account_fen AS ours_financial_account_fen, t.financial_account_fen AS theirs_financial_account_fen,
       o.settlement_count AS ours_count, t.settlement_count AS theirs_count
FROM ours o FULL OUTER JOIN theirs t
  ON o.ins_type = t.ins_type AND o.clearing_type = t.clearing_type AND o.clearing_agency = t.clearing_agency
WHERE o.ins_type IS NULL OR t.ins_type IS NULL
   OR o.medical_total_fen <> t.medical_total_fen OR o.fund_fen <> t.fund_fen
   OR o.insurance_account_fen <> t.insurance_account_fen OR o.financial_account_fen <> t.financial_account_fen
   OR o.settlement_count <> t.settlement_count
ORDER BY ALL;
