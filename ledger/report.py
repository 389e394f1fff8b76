"""`yikatong report --date D -o report.html`: one self-contained HTML page (inline SVG, no
network) an operator would rather look at than read: the day's volumes and amounts, the
response-code mix, throughput by hour, the 异地清算 matrix as a heatmap, institution settlement."""
import html

from . import jobs

COMMANDS = {1: "balance inquiry 余额查询", 2: "purchase 消费", 3: "void 消费撤销", 4: "refund 退货",
            5: "medical settlement 就医结算", 6: "settlement cancel 结算撤销", 7: "pre-settlement 预结算",
            8: "deposit 存款", 9: "withdrawal 取款", 10: "transfer 转账", 11: "reversal 冲正"}


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    fen = abs(int(fen))
    return f"{sign}{fen // 100:,}.{fen % 100:02d}"


def bars_svg(values: list[tuple[str, int]], width: int = 720, height: int = 220) -> str:
    top = max([v for _, v in values] + [1])
    n = max(len(values), 1)
    bar = width / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img">']
    for i, (label, value) in enumerate(values):
        h = value / top * height
        parts.append(f'<rect x="{i * bar + 2:.1f}" y="{height - h:.1f}" width="{bar - 4:.1f}" height="{h:.1f}" fill="#2b6cb0">'
                     f'<title>{html.escape(label)}: {value:,}</title></rect>')
        parts.append(f'<text x="{i * bar + bar / 2:.1f}" y="{height + 16}" font-size="11" text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def table_html(headers, rows, cls="") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def heatmap_html(matrix_rows: list[dict]) -> str:
    insured = sorted({r["insured_region"] for r in matrix_rows})
    treated = sorted({r["treatment_region"] for r in matrix_rows})
    cells = {(r["insured_region"], r["treatment_region"]): r["owed_fen"] for r in matrix_rows}
    top = max([abs(v) for v in cells.values()] + [1])
    rows = []
    for a in insured:
        row = [f"<th>{a}</th>"]
        for b in treated:
            v = cells.get((a, b), 0)
            shade = int(255 - 180 * abs(v) / top)
            row.append(f'<td style="background: rgb({shade},{shade},255)">{yuan(v)}</td>')
        rows.append("<tr>" + "".join(row) + "</tr>")
    head = "<tr><th>insured 参保地 \\\\ treatment 就医地</th>" + "".join(f"<th>{b}</th>" for b in treated) + "</tr>"
    return f'<table class="heatmap">{head}{"".join(rows)}</table>' if matrix_rows else "<p>no cross-region settlements</p>"


def render(con, business_date: int) -> str:
    summary = jobs.run_sql(con, "day_summary", date=business_date).to_pylist()
    hours = jobs.run_sql(con, "by_hour", date=business_date).to_pylist()
    matrix, positions = jobs.clearing(con, business_date // 100)
    institutions = jobs.institution_settlement(con, business_date, business_date).to_pylist()
    by_cmd: dict[int, list] = {}
    codes: dict[str, int] = {}
    for row in summary:
        entry = by_cmd.setdefault(row["cmd"], [0, 0])
        entry[0] += row["messages"]
        entry[1] += row["amount_fen"]
        codes[row["code"]] = codes.get(row["code"], 0) + row["messages"]
    total_messages = sum(v[0] for v in by_cmd.values())
    settled = by_cmd.get(5, [0, 0])
    volume_rows = [(html.escape(COMMANDS.get(c, str(c))), f"{v[0]:,}", yuan(v[1])) for c, v in sorted(by_cmd.items())]
    hour_values = [(f"{h:02d}", 0) for h in range(24)]
    for row in hours:
        if 0 <= row["hour"] < 24:
            hour_values[row["hour"]] = (f"{row['hour']:02d}", row["messages"])
    inst_rows = [(html.escape(r["institution_code"]), r["insured_region"], r["ins_type"], yuan(r["fund_fen"]),
                  yuan(r["insurance_account_fen"]), yuan(r["financial_account_fen"]), yuan(r["owed_fen"]),
                  f"{r['settlement_count']:,}") for r in institutions]
    position_rows = [(r["region"], yuan(r["net_position_fen"])) for r in positions.to_pylist()]
    date_text = f"{business_date // 10000}-{business_date // 100 % 100:02d}-{business_date % 100:02d}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>yikatong daily report {date_text}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #1a202c; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; border-bottom: 1px solid #cbd5e0; }}
.kpis {{ display: flex; gap: 24px; }} .kpi {{ background: #ebf4ff; padding: 12px 18px; border-radius: 6px; }}
.kpi b {{ display: block; font-size: 20px; }}
table {{ border-collapse: collapse; margin-top: 8px; }} td, th {{ border: 1px solid #e2e8f0; padding: 4px 10px; text-align: right; }}
th {{ background: #f7fafc; }}
</style></head><body>
<h1>Daily report 日报 — business date 营业日 {date_text}</h1>
<div class="kpis">
<div class="kpi">messages 交易笔数<b id="total-messages">{total_messages:,}</b></div>
<div class="kpi">medical settlements 就医结算<b id="settlement-count">{settled[0]:,}</b></div>
<div class="kpi">medical total 医疗费总额 (yuan)<b id="settlement-amount">{yuan(settled[1])}</b></div>
</div>
<h2>Volumes and amounts 交易量与金额</h2>
{table_html(("command", "messages", "amount (yuan)"), volume_rows)}
<h2>Response codes 应答码</h2>
{bars_svg(sorted(codes.items()))}
<h2>Throughput by hour 每小时交易量</h2>
{bars_svg(hour_values)}
<h2>Cross-region clearing 异地清算 ({business_date // 100})</h2>
{heatmap_html(matrix.to_pylist())}
{table_html(("region", "net position (yuan)"), position_rows)}
<h2>Institution settlement 机构结算</h2>
{table_html(("institution", "insured region", "insurance type", "fund 统筹", "insurance accounts 个账", "financial accounts 金融", "owed 应付", "settlements"), inst_rows)}
</body></html>
"""
