-- What each hospital / pharmacy is owed, by source, net of cancels and reversals.
SELECT institution_code, insured_region, ins_type,
       SUM(fund_fen)::BIGINT AS fund_fen,
       SUM(ins_leg_fen + aid_leg_fen)::BIGINT AS insurance_account_fen,
       SUM(fin_leg_fen)::BIGINT AS financial_account_fen,
       SUM(fund_fen + ins_leg_fen + aid_leg_fen + fin_leg_fen)::BIGINT AS owed_fen,
       SUM(direction)::BIGINT AS settlement_count
FROM settlements
WHERE business_date BETWEEN ${date_from} AND ${date_to}
GROUP BY ALL
ORDER BY ALL;
