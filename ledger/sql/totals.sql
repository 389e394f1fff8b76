-- 对总账: per insurance type (险种), clearing type (local / 异地) and clearing agency (the insured
-- region's fund): medical total, fund, insurance accounts (own + family aid), financial accounts, count.
SELECT ins_type, clearing_type, insured_region AS clearing_agency,
       SUM(signed_total_fen)::BIGINT AS medical_total_fen,
       SUM(fund_fen)::BIGINT AS fund_fen,
       SUM(ins_leg_fen + aid_leg_fen)::BIGINT AS insurance_account_fen,
       SUM(fin_leg_fen)::BIGINT AS financial_account_fen,
       SUM(direction)::BIGINT AS settlement_count
FROM settlements
WHERE business_date BETWEEN ${date_from} AND ${date_to}
GROUP BY ALL
ORDER BY ALL;
