-- The medical settlements that moved money, net of cancels and reversals (direction = ±1), with
-- the insured region (the card's 参保地) and the treatment region (the institution's 就医地).
-- A reversal (cmd 11) counts when its original (by RRN) was a settlement (5) or a cancel (6).
CREATE OR REPLACE TEMP VIEW settlements AS
WITH originals AS (
  SELECT rrn, cmd AS orig_cmd FROM journal WHERE record_kind = 1 AND NOT duplicate AND rrn <> 0
)
SELECT j.*, c.insured_region, c.ins_type, i.treatment_region, i.institution_code,
       CASE WHEN c.insured_region = i.treatment_region THEN 'local' ELSE 'cross-region' END AS clearing_type
FROM journal j
LEFT JOIN originals o ON o.rrn = j.orig_rrn
JOIN cards c USING (card_slot)
JOIN institutions i USING (institution_index)
WHERE j.record_kind = 1 AND j.posted AND NOT j.duplicate
  AND (j.cmd IN (5, 6) OR (j.cmd = 11 AND o.orig_cmd IN (5, 6)));
