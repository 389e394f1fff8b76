-- 对明细账: the ledger's settlements of one business date against the counterpart's detail file,
-- one row per settlement id (the RRN the engine assigned). Every difference is classified:
--   only_in_ledger  (e.g. a timed-out settlement the other side never saw: suggested reversal 冲正)
--   only_in_file    (e.g. a refund done outside the engine)
--   mismatch_<field> per differing amount or flag.
WITH ours AS (
  SELECT rrn AS setl_id, (cmd = 6 OR (cmd = 11 AND direction < 0)) AS refund_flag,
         pan_last4, amount_fen AS total_fen, fund_fen, ins_leg_fen + aid_leg_fen AS insurance_account_fen
  FROM settlements WHERE business_date = ${date}
),
theirs AS (
  SELECT * FROM read_csv('${file}', header = true, columns = {
    'setl_id': 'UBIGINT', 'visit_id': 'VARCHAR', 'person': 'VARCHAR', 'total_fen': 'BIGINT',
    'fund_fen': 'BIGINT', 'insurance_account_fen': 'BIGINT', 'refund_flag': 'BOOLEAN'})
),
joined AS (
  SELECT COALESCE(o.setl_id, t.setl_id) AS setl_id, t.visit_id, o.pan_last4,
         o.total_fen AS ours_total_fen, t.total_fen AS theirs_total_fen,
         o.fund_fen AS ours_fund_fen, t.fund_fen AS theirs_fund_fen,
         o.insurance_account_fen AS ours_insurance_account_fen, t.insurance_account_fen AS theirs_insurance_account_fen,
         o.refund_flag AS ours_refund_flag, t.refund_flag AS theirs_refund_flag,
         o.setl_id IS NULL AS missing_ours, t.setl_id IS NULL AS missing_theirs
  FROM ours o FULL OUTER JOIN theirs t ON o.setl_id = t.setl_id
)
SELECT setl_id, visit_id, pan_last4, difference, suggestion,
       ours_total_fen, theirs_total_fen, ours_fund_fen, theirs_fund_fen,
       ours_insurance_account_fen, theirs_insurance_account_fen
FROM (
  SELECT *, 'only_in_ledger' AS difference, 'reverse (冲正) or send to the counterpart' AS suggestion FROM joined WHERE missing_theirs
  UNION ALL SELECT *, 'only_in_file', 'investigate: not settled by this engine' FROM joined WHERE missing_ours
  UNION ALL SELECT *, 'mismatch_total_fen', 'check the claim' FROM joined WHERE NOT missing_ours AND NOT missing_theirs AND ours_total_fen <> theirs_total_fen
  UNION ALL SELECT *, 'mismatch_fund_fen', 'check the fund amount' FROM joined WHERE NOT missing_ours AND NOT missing_theirs AND ours_fund_fen <> theirs_fund_fen
  UNION ALL SELECT *, 'mismatch_insurance_account_fen', 'check the insurance account' FROM joined WHERE NOT missing_ours AND NOT missing_theirs AND ours_insurance_account_fen <> theirs_insurance_account_fen
  UNION ALL SELECT *, 'mismatch_refund_flag', 'check the refund' FROM joined WHERE NOT missing_ours AND NOT missing_theirs AND ours_refund_flag <> theirs_refund_flag
)
ORDER BY setl_id, difference;
