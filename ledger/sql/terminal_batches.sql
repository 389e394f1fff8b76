-- Terminal batch totals for a date (what an 0500 compares, PROTOCOL.md §3.4): per terminal and
-- batch, debits (approved purchases, medical settlements at their total, withdrawals, transfers
-- out) and credits (refunds, deposits); voided, cancelled and reversed ones count in neither.
WITH undone AS (   -- originals taken back by a void (3), cancel (6) or reversal (11)
  SELECT DISTINCT orig_rrn AS rrn FROM journal
  WHERE record_kind = 1 AND posted AND NOT duplicate AND cmd IN (3, 6, 11) AND orig_rrn <> 0
)
SELECT t.terminal_id, j.batch_no,
       SUM(CASE WHEN j.cmd IN (2, 5, 9, 10) THEN j.amount_fen ELSE 0 END)::BIGINT AS debit_fen,
       COUNT(*) FILTER (WHERE j.cmd IN (2, 5, 9, 10))::BIGINT AS debit_count,
       SUM(CASE WHEN j.cmd IN (4, 8) THEN j.amount_fen ELSE 0 END)::BIGINT AS credit_fen,
       COUNT(*) FILTER (WHERE j.cmd IN (4, 8))::BIGINT AS credit_count
FROM journal j JOIN terminals t USING (terminal_index)
WHERE j.record_kind = 1 AND j.posted AND NOT j.duplicate AND j.business_date = ${date}
  AND j.cmd IN (2, 4, 5, 8, 9, 10) AND j.rrn NOT IN (SELECT rrn FROM undone)
GROUP BY ALL
ORDER BY ALL;
