"""Bitrix24's documented payloads through the module's pure half and the client's ``_snapshot``.

The samples are the examples of the REST docs (``shared/reference/bitrix24/``, a copy of
``bitrix24/b24restdocs``), copied as they are; events are documented as JSON but arrive as a
form with PHP-style keys (``data[FIELDS][ID]=300``), so they are flattened here the same way.
Nothing goes over the network.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from bridge.config import Settings
from bridge.models import Snapshot
from bridge.platforms.base import ClientContext, ReadFailed, WebhookRejected
from bridge.platforms.bitrix24 import (
    B24Error,
    Bitrix24Client,
    classify_error,
    error_of,
    parse_event,
)

# -- the samples, as the docs give them -------------------------------------------------------

# sale_order_sale-order-get.md: sale.order.get, "Response Handling"
SALE_ORDER_GET = json.loads(
    r"""
{
    "result": {
        "order": {
            "accountNumber": "392",
            "additionalInfo": "",
            "affiliateId": null,
            "basketItems": [
                {
                    "barcodeMulti": "N",
                    "basePrice": 980,
                    "canBuy": "Y",
                    "catalogXmlId": "cbc2957f-09fc-4b2a-b9de-6f925c4c9047",
                    "currency": "USD",
                    "customPrice": "N",
                    "dateInsert": "2024-02-28T17:35:06+02:00",
                    "dateRefresh": null,
                    "dateUpdate": "2024-02-28T17:37:08+02:00",
                    "detailPageUrl": "",
                    "dimensions": "a:3:{s:5:\u0022WIDTH\u0022;N;s:6:\u0022HEIGHT\u0022;N;s:6:\u0022LENGTH\u0022;N;}",
                    "discountCoupon": "",
                    "discountName": "",
                    "discountPrice": 0,
                    "discountValue": "",
                    "fuserId": 4,
                    "id": "255",
                    "lid": "s1",
                    "measureCode": "796",
                    "measureName": "pcs",
                    "module": "catalog",
                    "name": "Men's Fire T-Shirt",
                    "notes": "BASE",
                    "orderId": "236",
                    "price": 980,
                    "priceTypeId": 1,
                    "productId": 348,
                    "productPriceId": 112,
                    "productProviderClass": "\\Bitrix\\Catalog\\Product\\CatalogProvider",
                    "productXmlId": "1000000386",
                    "properties": [
                        {
                            "basketId": 255,
                            "code": "CATALOG.XML_ID",
                            "id": 139,
                            "name": "Catalog XML_ID",
                            "sort": 100,
                            "value": "cbc2957f-09fc-4b2a-b9de-6f925c4c9047",
                            "xmlId": "bx_65df52a9ac502"
                        },
                        {
                            "basketId": 255,
                            "code": "PRODUCT.XML_ID",
                            "id": 140,
                            "name": "Product XML_ID",
                            "sort": 100,
                            "value": "1000000386",
                            "xmlId": "bx_65df52a9ace55"
                        }
                    ],
                    "quantity": 1,
                    "recommendation": "",
                    "reservations": [
                        {
                            "basketId": 255,
                            "dateReserve": "2024-02-28T17:36:51+02:00",
                            "dateReserveEnd": "2024-03-01T23:00:00+02:00",
                            "id": 39,
                            "quantity": 1,
                            "reservedBy": null,
                            "storeId": 1
                        }
                    ],
                    "setParentId": "",
                    "sort": 100,
                    "subscribe": "N",
                    "type": "",
                    "vatIncluded": "Y",
                    "vatRate": 0.2,
                    "weight": 0,
                    "xmlId": "bx_65df52a9ab47f"
                }
            ],
            "canceled": "N",
            "clients": [
                {
                    "entityId": 6,
                    "entityTypeId": 3,
                    "id": 901,
                    "isPrimary": "Y",
                    "orderId": 236,
                    "roleId": 0,
                    "sort": 0
                }
            ],
            "comments": "",
            "companyId": 0,
            "currency": "USD",
            "dateCanceled": null,
            "dateInsert": "2024-02-28T17:36:55+02:00",
            "dateLock": null,
            "dateMarked": null,
            "dateStatus": "2024-02-28T17:36:38+02:00",
            "dateUpdate": "2024-02-28T17:37:11+02:00",
            "deducted": "N",
            "discountValue": 0,
            "empCanceledId": null,
            "empMarkedId": null,
            "empStatusId": 1,
            "externalOrder": "N",
            "id": 236,
            "id1c": "",
            "lid": "s1",
            "lockedBy": "",
            "marked": "N",
            "orderTopic": "",
            "payed": "N",
            "payments": [
                {
                    "accountNumber": "392\/1",
                    "comments": "",
                    "companyId": 0,
                    "currency": "USD",
                    "dateBill": "2024-02-28T17:36:44+02:00",
                    "dateMarked": null,
                    "datePaid": null,
                    "datePayBefore": null,
                    "dateResponsibleId": null,
                    "empMarkedId": null,
                    "empPaidId": null,
                    "empResponsibleId": null,
                    "empReturnId": null,
                    "externalPayment": "N",
                    "id": 123,
                    "id1c": "",
                    "isReturn": "N",
                    "marked": "N",
                    "orderId": 236,
                    "paid": "N",
                    "payReturnComment": "",
                    "payReturnDate": null,
                    "payReturnNum": "",
                    "paySystemId": 48,
                    "paySystemIsCash": "N",
                    "paySystemName": "Card Payment",
                    "paySystemXmlId": "bx_65df3d512af59",
                    "payVoucherDate": null,
                    "payVoucherNum": "",
                    "priceCod": "0",
                    "psCurrency": "",
                    "psInvoiceId": 2,
                    "psResponseDate": null,
                    "psStatus": "",
                    "psStatusCode": "",
                    "psStatusDescription": "",
                    "psStatusMessage": "",
                    "psSum": null,
                    "reasonMarked": "",
                    "responsibleId": null,
                    "sum": 1480,
                    "updated1c": "N",
                    "version1c": "",
                    "xmlId": "bx_65df530c472fa"
                }
            ],
            "personTypeId": 3,
            "personTypeXmlId": "",
            "price": 1480,
            "propertyValues": [
                {
                    "code": "FIO",
                    "id": 1514,
                    "name": "First Last",
                    "orderPropsId": 20,
                    "orderPropsXmlId": null,
                    "value": "John Smith"
                },
                {
                    "code": "EMAIL",
                    "id": 1515,
                    "name": "E-Mail1",
                    "orderPropsId": 21,
                    "orderPropsXmlId": "bx_63a082af0d250",
                    "value": "email@mail.com"
                },
                {
                    "code": "PHONE",
                    "id": 1516,
                    "name": "Phone1",
                    "orderPropsId": 22,
                    "orderPropsXmlId": "bx_63a082a06864d",
                    "value": "14151234567"
                },
                {
                    "code": "CONTACT_ADDRESS",
                    "id": 1517,
                    "name": "Address",
                    "orderPropsId": 42,
                    "orderPropsXmlId": null,
                    "value": null
                },
                {
                    "code": "ADDRESS",
                    "id": 1518,
                    "name": "Delivery Address",
                    "orderPropsId": 26,
                    "orderPropsXmlId": null,
                    "value": "test"
                }
            ],
            "reasonCanceled": "",
            "reasonMarked": "",
            "recountFlag": "Y",
            "recurringId": "",
            "requisiteLink": {
                "bankDetailId": 0,
                "mcBankDetailId": 0,
                "mcRequisiteId": 0,
                "requisiteId": 3
            },
            "responsibleId": 1,
            "shipments": [
                {
                    "accountNumber": "392\/2",
                    "allowDelivery": "N",
                    "basePriceDelivery": 500,
                    "canceled": "N",
                    "comments": "",
                    "companyId": 0,
                    "currency": "USD",
                    "customPriceDelivery": "N",
                    "dateAllowDelivery": null,
                    "dateCanceled": null,
                    "dateDeducted": null,
                    "dateInsert": "2024-02-28T17:36:41+02:00",
                    "dateMarked": null,
                    "dateResponsibleId": null,
                    "deducted": "N",
                    "deliveryDocDate": null,
                    "deliveryDocNum": "",
                    "deliveryId": 1,
                    "deliveryName": "Courier Delivery",
                    "deliveryXmlId": "",
                    "discountPrice": 0,
                    "empAllowDeliveryId": null,
                    "empCanceledId": null,
                    "empDeductedId": null,
                    "empMarkedId": null,
                    "empResponsibleId": null,
                    "externalDelivery": "N",
                    "id": 338,
                    "id1c": "",
                    "marked": "N",
                    "orderId": 236,
                    "priceDelivery": 500,
                    "reasonMarked": "",
                    "reasonUndoDeducted": "",
                    "responsibleId": null,
                    "shipmentItems": [
                        {
                            "basketId": 255,
                            "dateInsert": "2024-02-28T17:36:53+02:00",
                            "id": 320,
                            "orderDeliveryId": 338,
                            "quantity": 1,
                            "reservedQuantity": 1,
                            "xmlId": "bx_65df5309cf490"
                        }
                    ],
                    "statusId": "DN",
                    "statusXmlId": "",
                    "system": "N",
                    "trackingDescription": "",
                    "trackingLastCheck": "",
                    "trackingNumber": "",
                    "trackingStatus": "",
                    "updated1c": "N",
                    "version1c": "",
                    "xmlId": "bx_65df5309939b8"
                }
            ],
            "statusId": "N",
            "statusXmlId": "",
            "taxValue": 163.33,
            "tradeBindings": [
                {
                    "externalOrderId": "236",
                    "id": 224,
                    "orderId": 236,
                    "params": null,
                    "tradingPlatformId": "9",
                    "tradingPlatformXmlId": "bx_659ff72864c8f",
                    "xmlId": "bx_65df53067ac59"
                }
            ],
            "updated1c": "N",
            "userDescription": "",
            "userId": 1,
            "version": 1,
            "version1c": "",
            "xmlId": "bx_65df53063d56d"
        }
    },
    "time": {
        "start": 1712938174.436428,
        "finish": 1712938175.432068,
        "duration": 0.9956400394439697,
        "processing": 0.5710320472717285,
        "date_start": "2024-04-12T19:09:34+02:00",
        "date_finish": "2024-04-12T19:09:35+02:00"
    }
}
"""
)

# sale_order_sale-order-list.md: sale.order.list, "Response Handling" (the docs' example has a comma after its only
# order, which JSON does not allow: dropped here)
SALE_ORDER_LIST = json.loads(
    r"""
{
    "result": {
        "orders": [
            {
                "accountNumber": "165",
                "additionalInfo": "",
                "affiliateId": null,
                "canceled": "N",
                "comments": "",
                "companyId": null,
                "currency": "USD",
                "dateCanceled": null,
                "dateInsert": "2022-10-14T17:19:11+02:00",
                "dateLock": null,
                "dateMarked": null,
                "dateStatus": "2022-10-14T17:19:03+02:00",
                "dateUpdate": "2022-10-14T17:19:11+02:00",
                "deducted": "N",
                "discountValue": 0,
                "empCanceledId": null,
                "empMarkedId": null,
                "empStatusId": 1,
                "externalOrder": "N",
                "id": 9,
                "id1c": "",
                "lid": "s1",
                "lockedBy": "",
                "marked": "N",
                "orderTopic": "",
                "payed": "N",
                "personTypeId": 4,
                "personTypeXmlId": "",
                "price": 1176,
                "reasonCanceled": "",
                "reasonMarked": "",
                "recountFlag": "Y",
                "recurringId": "",
                "responsibleId": 1,
                "statusId": "N",
                "statusXmlId": "",
                "taxValue": 196,
                "updated1c": "N",
                "userDescription": "",
                "userId": 2,
                "version": 0,
                "version1c": "",
                "xmlId": "bx_63498bf7c8d31"
            }
        ]
    },
    "total": 1,
    "time": {
        "start": 1712847891.436862,
        "finish": 1712847892.028163,
        "duration": 0.5913009643554688,
        "processing": 0.1332709789276123,
        "date_start": "2024-04-11T18:04:51+02:00",
        "date_finish": "2024-04-11T18:04:52+02:00"
    }
}
"""
)

# sale_order_sale-order-update.md: sale.order.update, "Response Handling"
SALE_ORDER_UPDATE = json.loads(
    r"""
{
    "result": {
        "order": {
            "accountNumber": "456",
            "additionalInfo": "",
            "affiliateId": 1,
            "canceled": "Y",
            "clients": [],
            "comments": "",
            "companyId": 1,
            "currency": "USD",
            "dateCanceled": "2024-04-12T14:06:05+02:00",
            "dateInsert": "2024-03-01T13:00:00+02:00",
            "dateLock": null,
            "dateMarked": "2024-04-15T10:21:14+02:00",
            "dateStatus": "2024-04-12T14:06:04+02:00",
            "dateUpdate": "2024-04-15T10:21:15+02:00",
            "deducted": "N",
            "discountValue": 10,
            "empCanceledId": 1,
            "empMarkedId": 1,
            "empStatusId": 1,
            "externalOrder": "N",
            "id": 300,
            "id1c": "",
            "lid": "s1",
            "lockedBy": "1",
            "marked": "N",
            "orderTopic": "",
            "payed": "N",
            "personTypeId": 1,
            "personTypeXmlId": "",
            "price": 100,
            "reasonCanceled": "",
            "reasonMarked": "",
            "recountFlag": "N",
            "recurringId": "1",
            "requisiteLink": [],
            "responsibleId": 1,
            "statusId": "N",
            "statusXmlId": "",
            "taxValue": null,
            "updated1c": "N",
            "userDescription": "",
            "userId": 1,
            "version": 3,
            "version1c": "",
            "xmlId": ""
        }
    },
    "time": {
        "start": 1713169274.29568,
        "finish": 1713169275.698528,
        "duration": 1.4028480052947998,
        "processing": 0.9852678775787354,
        "date_start": "2024-04-15T11:21:14+02:00",
        "date_finish": "2024-04-15T11:21:15+02:00"
    }
}
"""
)

# crm_deals_crm-deal-get.md: crm.deal.get, "Response Handling"
CRM_DEAL_GET = json.loads(
    r"""
{
    "result": {
        "ID": "410",
        "TITLE": "New Deal #1",
        "TYPE_ID": "COMPLEX",
        "STAGE_ID": "PREPARATION",
        "PROBABILITY": "99",
        "CURRENCY_ID": "EUR",
        "OPPORTUNITY": "1000000.00",
        "IS_MANUAL_OPPORTUNITY": "Y",
        "TAX_VALUE": "0.00",
        "LEAD_ID": null,
        "COMPANY_ID": "9",
        "CONTACT_ID": "84",
        "QUOTE_ID": null,
        "BEGINDATE": "2024-08-30T02:00:00+02:00",
        "CLOSEDATE": "2024-09-09T02:00:00+02:00",
        "ASSIGNED_BY_ID": "1",
        "CREATED_BY_ID": "1",
        "MODIFY_BY_ID": "1",
        "DATE_CREATE": "2024-08-30T14:29:00+02:00",
        "DATE_MODIFY": "2024-08-30T14:29:00+02:00",
        "OPENED": "Y",
        "CLOSED": "N",
        "COMMENTS": "[B]Example comment[\/B]",
        "ADDITIONAL_INFO": "Additional information",
        "LOCATION_ID": null,
        "CATEGORY_ID": "0",
        "STAGE_SEMANTIC_ID": "P",
        "IS_NEW": "N",
        "IS_RECURRING": "N",
        "IS_RETURN_CUSTOMER": "N",
        "IS_REPEATED_APPROACH": "N",
        "SOURCE_ID": "CALLBACK",
        "SOURCE_DESCRIPTION": "Additional source information",
        "ORIGINATOR_ID": null,
        "ORIGIN_ID": null,
        "MOVED_BY_ID": "1",
        "MOVED_TIME": "2024-08-30T14:29:00+02:00",
        "LAST_ACTIVITY_TIME": "2024-08-30T14:29:00+02:00",
        "UTM_SOURCE": "google",
        "UTM_MEDIUM": "CPC",
        "UTM_CAMPAIGN": null,
        "UTM_CONTENT": null,
        "UTM_TERM": null,
        "PARENT_ID_1220": "22",
        "LAST_ACTIVITY_BY": "1",
        "UF_CRM_1721244482250": "Hello world!"
    },
    "time": {
        "start": 1725020945.541275,
        "finish": 1725020946.179076,
        "duration": 0.637800931930542,
        "processing": 0.21427488327026367,
        "date_start": "2024-08-30T14:29:05+02:00",
        "date_finish": "2024-08-30T14:29:06+02:00",
        "operating": 0
    }
}
"""
)

# crm_deals_crm-deal-list.md: crm.deal.list, "Response Handling"
CRM_DEAL_LIST = json.loads(
    r"""
{
    "result": [
        {
            "ID": "37",
            "TITLE": "[A] Deal",
            "TYPE_ID": "COMPLEX",
            "CATEGORY_ID": "1",
            "STAGE_ID": "C1:NEW",
            "OPPORTUNITY": "19999.99",
            "IS_MANUAL_OPPORTUNITY": "Y",
            "ASSIGNED_BY_ID": "1",
            "DATE_CREATE": "2024-09-02T18:37:18+02:00"
        },
        {
            "ID": "38",
            "TITLE": "[A] Deal",
            "TYPE_ID": "COMPLEX",
            "CATEGORY_ID": "1",
            "STAGE_ID": "C1:NEW",
            "OPPORTUNITY": "20000.00",
            "IS_MANUAL_OPPORTUNITY": "Y",
            "ASSIGNED_BY_ID": "6",
            "DATE_CREATE": "2024-09-02T18:37:38+02:00"
        },
        {
            "ID": "39",
            "TITLE": "[B] Sale",
            "TYPE_ID": "COMPLEX",
            "CATEGORY_ID": "1",
            "STAGE_ID": "C1:NEW",
            "OPPORTUNITY": "12500.00",
            "IS_MANUAL_OPPORTUNITY": "Y",
            "ASSIGNED_BY_ID": "1",
            "DATE_CREATE": "2024-04-09T23:11:01+02:00"
        },
        {
            "ID": "40",
            "TITLE": "[B] Deal",
            "TYPE_ID": "COMPLEX",
            "CATEGORY_ID": "1",
            "STAGE_ID": "C1:NEW",
            "OPPORTUNITY": "13500.00",
            "IS_MANUAL_OPPORTUNITY": "Y",
            "ASSIGNED_BY_ID": "6",
            "DATE_CREATE": "2024-08-08T19:00:14+02:00"
        },
        {
            "ID": "41",
            "TITLE": "[V] Deal",
            "TYPE_ID": "COMPLEX",
            "CATEGORY_ID": "1",
            "STAGE_ID": "C1:NEW",
            "OPPORTUNITY": "11500.00",
            "IS_MANUAL_OPPORTUNITY": "Y",
            "ASSIGNED_BY_ID": "6",
            "DATE_CREATE": "2024-05-08T09:38:23+02:00"
        },
        {
            "ID": "42",
            "TITLE": "[S] Deal",
            "TYPE_ID": "COMPLEX",
            "CATEGORY_ID": "1",
            "STAGE_ID": "C1:NEW",
            "OPPORTUNITY": "18500.00",
            "IS_MANUAL_OPPORTUNITY": "Y",
            "ASSIGNED_BY_ID": "6",
            "DATE_CREATE": "2024-07-02T15:38:32+02:00"
        }
    ],
    "total": 6,
    "time": {
        "start": 1725292115.026221,
        "finish": 1725292115.907058,
        "duration": 0.8808369636535645,
        "processing": 0.2484450340270996,
        "date_start": "2024-09-02T17:48:35+02:00",
        "date_finish": "2024-09-02T17:48:35+02:00",
        "operating": 0
    }
}
"""
)

# crm_deals_crm-deal-update.md: crm.deal.update, "Response Handling"
CRM_DEAL_UPDATE = json.loads(
    r"""
{
    "result": true,
    "time": {
        "start": 1725365418.056843,
        "finish": 1725365419.671506,
        "duration": 1.6146628856658936,
        "processing": 1.3475170135498047,
        "date_start": "2024-09-03T14:10:18+02:00",
        "date_finish": "2024-09-03T14:10:19+02:00",
        "operating": 0
    }
}
"""
)

# batch.md: batch, "Response Handling"
BATCH = json.loads(
    r"""
{
    "result": {
        "result": {
            "get_user": {
                "ID": "1",
                "ACTIVE": true,
                "NAME": "John",
                "LAST_NAME": "Doe",
                "EMAIL": "my@example.com",
                "LAST_LOGIN": "2024-08-29T10:29:54+03:00",
                "DATE_REGISTER": "2023-08-24T03:00:00+03:00",
                "IS_ONLINE": "Y",
                "TIMESTAMP_X": "24.08.2023 13:19:39",
                "LAST_ACTIVITY_DATE": "2024-08-29 10:30:11",
                "PERSONAL_GENDER": "",
                "PERSONAL_BIRTHDAY": "",
                "UF_EMPLOYMENT_DATE": "",
                "UF_DEPARTMENT": [
                    1
                ]
            },
            "get_department": [
                {
                    "ID": "1",
                    "NAME": "DEMO",
                    "SORT": 500
                }
            ]
        },
        "result_error": [],
        "result_total": {
            "get_department": 1
        },
        "result_next": [],
        "result_time": {
            "get_user": {
                "start": 1724916859.46156,
                "finish": 1724916859.464775,
                "duration": 0.0032150745391845703,
                "processing": 0.003075838088989258,
                "date_start": "2024-08-29T10:34:19+03:00",
                "date_finish": "2024-08-29T10:34:19+03:00"
            },
            "get_department": {
                "start": 1724916859.464944,
                "finish": 1724916859.471518,
                "duration": 0.006574153900146484,
                "processing": 0.005941152572631836,
                "date_start": "2024-08-29T10:34:19+03:00",
                "date_finish": "2024-08-29T10:34:19+03:00"
            }
        }
    },
    "time": {
        "start": 1724916859.421475,
        "finish": 1724916859.471588,
        "duration": 0.05011296272277832,
        "processing": 0.010200977325439453,
        "date_start": "2024-08-29T10:34:19+03:00",
        "date_finish": "2024-08-29T10:34:19+03:00"
    }
}
"""
)

# batch.md: batch, "Response Handling": every command refused
BATCH_ALL_FAILED = json.loads(
    r"""
{
    "result": {
        "result": [],
        "result_error": {
            "get_user": {
                "error": "insufficient_scope",
                "error_description": ""
            },
            "get_department": {
                "error": "insufficient_scope",
                "error_description": ""
            }
        },
        "result_total": [],
        "result_next": [],
        "result_time": []
    },
    "time": {
        "start": 1724916638.077564,
        "finish": 1724916638.132399,
        "duration": 0.05483508110046387,
        "processing": 0.0017969608306884766,
        "date_start": "2024-08-29T10:30:38+03:00",
        "date_finish": "2024-08-29T10:30:38+03:00"
    }
}
"""
)

# sale_events_on-sale-order-saved.md: OnSaleOrderSaved, what the handler receives (shown as JSON, sent as a form)
ON_SALE_ORDER_SAVED = json.loads(
    r"""
{
    "event": "ONSALEORDERSAVED",
    "event_handler_id": 1,
    "data": {
        "FIELDS": {
            "ID": 300,
            "XML_ID": "",
            "ACTION": "save"
        }
    },
    "ts": 1714649632,
    "auth": {
        "access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv",
        "expires_in": 3600,
        "scope": "sale",
        "domain": "some-domain.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "F",
        "client_endpoint": "https://some-domain.bitrix24.com/rest/",
        "member_id": "a223c6b3710f85df22e9377d6c4f7553",
        "refresh_token": "4s386p3q0tr8dy89xvmt96234v3dljg8",
        "application_token": "51856fefc120afa4b628cc82d3935cce"
    }
}
"""
)

# sale_events_on-order-entity-saved.md: OnOrderEntitySaved
ON_ORDER_ENTITY_SAVED = json.loads(
    r"""
{
    "event": "ONORDERENTITYSAVED",
    "event_handler_id": 1,
    "data": {
        "FIELDS": {
            "ID": 300
        }
    },
    "ts": 1714649632,
    "auth": {
        "access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv",
        "expires_in": 3600,
        "scope": "sale",
        "domain": "some-domain.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "F",
        "client_endpoint": "https://some-domain.bitrix24.com/rest/",
        "member_id": "a223c6b3710f85df22e9377d6c4f7553",
        "refresh_token": "4s386p3q0tr8dy89xvmt96234v3dljg8",
        "application_token": "51856fefc120afa4b628cc82d3935cce"
    }
}
"""
)

# crm_deals_events_on-crm-deal-update.md: ONCRMDEALUPDATE
ON_CRM_DEAL_UPDATE = json.loads(
    r"""
{
    "event": "ONCRMDEALUPDATE",
    "event_handler_id": "201",
    "data": {
        "FIELDS": {
            "ID": "759"
        }
    },
    "ts": "1736405807",
    "auth": {
        "access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv",
        "expires_in": "3600",
        "scope": "crm",
        "domain": "some-domain.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "F",
        "client_endpoint": "https://some-domain.bitrix24.com/rest/",
        "member_id": "a223c6b3710f85df22e9377d6c4f7553",
        "refresh_token": "4s386p3q0tr8dy89xvmt96234v3dljg8",
        "application_token": "51856fefc120afa4b628cc82d3935cce"
    }
}
"""
)

# events_index.md: events/index: ONCRMDEALADD as an application's handler gets it
ON_CRM_DEAL_ADD_APP = json.loads(
    r"""
{
    "event": "ONCRMDEALADD",
    "event_handler_id": "185",
    "data": {
        "FIELDS": {
            "ID": "7405"
        }
    },
    "ts": "1766047124",
    "auth": {
        "access_token": "s6p6eclrvim6da22ft9ch94ekreb52lv",
        "expires_in": "3600",
        "scope": "crm",
        "domain": "some-domain.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "L",
        "client_endpoint": "https://some-domain.bitrix24.com/rest/",
        "member_id": "d897063e1ce7c5eb9f04b9751eef5915",
        "application_token": "51856fefc120afa4b628cc82d3935cce"
    }
}
"""
)

# events_index.md: events/index: ONCRMDEALADD as an outgoing webhook gets it (no tokens)
ON_CRM_DEAL_ADD_WEBHOOK = json.loads(
    r"""
{
    "event": "ONCRMDEALADD",
    "event_handler_id": "975",
    "data": {
        "FIELDS": {
            "ID": "7405"
        }
    },
    "ts": "1766047124",
    "auth": {
        "domain": "some-domain.bitrix24.com",
        "client_endpoint": "https://some-domain.bitrix24.com/rest/",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "member_id": "d897063e1ce7c5eb9f04b9751eef5915",
        "application_token": "jvh9y1ulvt2m6k5or90v9mg8nn32ozas"
    }
}
"""
)

# Error answers: each method page's example, and rows of its "Possible Error Codes" table.
# sale_order_sale-order-get.md (also sale.order.update's example)
SALE_ORDER_NOT_FOUND = {"error": 200540400001, "error_description": "order does not exist"}
# sale_status_sale-status-get.md
SALE_STATUS_NOT_FOUND = {"error": 201340400001, "error_description": "status does not exist"}
# sale_status_sale-status-update.md
SALE_STATUS_NO_TYPE = {"error": 0, "error_description": "Required fields: type"}
# sale_status_sale-status-add.md
SALE_STATUS_DUPLICATE = {"error": 201350000001, "error_description": "Duplicate entry for key [id]"}
# sale_order_sale-order-list.md
SALE_OTHER_ERROR = {"error": 0, "error_description": "error"}
# crm_deals_crm-deal-get.md (and crm.deal.update's)
CRM_FIELDS_NOT_ARRAY = {"error": "", "error_description": "Parameter 'fields' must be array."}
# crm_deals_crm-deal-list.md
CRM_FILTER_NOT_ARRAY = {"error": "", "error_description": "Parameter 'filter' must be array."}
# events_event-bind.md
EVENT_NOT_FOUND = {"error": "ERROR_EVENT_NOT_FOUND", "error_description": "Event not found"}
# table rows: sale.order.get 201240400001, crm.deal.get "Not found" / "ID is not defined ..."
SALE_ORDER_GET_NOT_FOUND = {"error": 201240400001, "error_description": "Order not found"}
CRM_NOT_FOUND = {"error": "", "error_description": "Not found"}
CRM_BAD_ID = {"error": "", "error_description": "ID is not defined or invalid."}
# table rows: the permission errors of sale.order.get / sale.order.update and crm.deal.get
SALE_READ_DENIED = {
    "error": 200040300010,
    "error_description": "Insufficient permissions to read the order",
}
SALE_UPDATE_DENIED = {
    "error": 200040300020,
    "error_description": "Insufficient permissions to update the order",
}
CRM_ACCESS_DENIED = {"error": "", "error_description": "Access denied"}
# limits.md gives the codes and statuses of the two limits (no body example).
QUERY_LIMIT = {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
OPERATION_LIMIT = {
    "error": "OPERATION_TIME_LIMIT",
    "error_description": "Method is blocked due to operation time limit.",
}

SUCCESSES = {
    "sale.order.get": SALE_ORDER_GET,
    "sale.order.list": SALE_ORDER_LIST,
    "sale.order.update": SALE_ORDER_UPDATE,
    "crm.deal.get": CRM_DEAL_GET,
    "crm.deal.list": CRM_DEAL_LIST,
    "crm.deal.update": CRM_DEAL_UPDATE,
    "batch": BATCH,
    "batch, every command refused": BATCH_ALL_FAILED,
}


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested document as the PHP-style form pairs Bitrix24 posts (``auth[domain]=...``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}[{key}]" if prefix else str(key))
    else:
        yield prefix, str(value)


def form(event: dict[str, Any]) -> bytes:
    return urlencode(list(flatten(event))).encode()


FORM = {"content-type": "application/x-www-form-urlencoded"}


def settings_for(event: dict[str, Any], mode: str = "orders") -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        bitrix24_mode=mode,
        bitrix24_application_token=event["auth"]["application_token"],
    )


# -- events -----------------------------------------------------------------------------------


def test_a_flattened_event_has_the_php_style_keys() -> None:
    pairs = dict(flatten(ON_SALE_ORDER_SAVED))
    assert pairs["event"] == "ONSALEORDERSAVED"
    assert pairs["data[FIELDS][ID]"] == "300"
    assert pairs["data[FIELDS][XML_ID]"] == ""
    assert pairs["auth[application_token]"] == "51856fefc120afa4b628cc82d3935cce"
    assert pairs["ts"] == "1714649632"


@pytest.mark.parametrize(
    ("event", "mode", "refs"),
    [
        (ON_SALE_ORDER_SAVED, "orders", ("300",)),
        (ON_ORDER_ENTITY_SAVED, "orders", ("300",)),
        (ON_CRM_DEAL_UPDATE, "deals", ("759",)),
        (ON_CRM_DEAL_ADD_APP, "deals", ("7405",)),
        (ON_CRM_DEAL_ADD_WEBHOOK, "deals", ("7405",)),
        # the other mode's events are acknowledged and ignored
        (ON_SALE_ORDER_SAVED, "deals", ()),
        (ON_ORDER_ENTITY_SAVED, "deals", ()),
        (ON_CRM_DEAL_UPDATE, "orders", ()),
        (ON_CRM_DEAL_ADD_WEBHOOK, "orders", ()),
    ],
)
def test_documented_events_are_parsed(
    event: dict[str, Any], mode: str, refs: tuple[str, ...]
) -> None:
    parsed = parse_event(settings_for(event, mode), FORM, form(event))
    assert parsed.event == event["event"]
    assert parsed.refs == refs


@pytest.mark.parametrize("event", [ON_SALE_ORDER_SAVED, ON_CRM_DEAL_UPDATE, ON_CRM_DEAL_ADD_APP])
def test_a_documented_event_for_another_application_is_refused(event: dict[str, Any]) -> None:
    # Each sample carries its own application's token; the webhook one has another.
    settings = settings_for(ON_CRM_DEAL_ADD_WEBHOOK, "deals")
    with pytest.raises(WebhookRejected) as caught:
        parse_event(settings, FORM, form(event))
    assert caught.value.status == 401


def test_an_event_sent_as_the_json_the_docs_show_is_refused() -> None:
    # The docs show the structure as JSON; what arrives is a form, and only a form is taken.
    body = json.dumps(ON_SALE_ORDER_SAVED).encode()
    with pytest.raises(WebhookRejected) as caught:
        parse_event(settings_for(ON_SALE_ORDER_SAVED), {"content-type": "application/json"}, body)
    assert caught.value.status == 400


# -- answers and errors -----------------------------------------------------------------------


@pytest.mark.parametrize("answer", SUCCESSES.values(), ids=SUCCESSES.keys())
def test_documented_successes_carry_no_error(answer: dict[str, Any]) -> None:
    assert error_of(200, answer) is None


@pytest.mark.parametrize(
    ("status", "body", "code", "kind"),
    [
        (400, SALE_ORDER_NOT_FOUND, "200540400001", "not_found"),
        (400, SALE_ORDER_GET_NOT_FOUND, "201240400001", "not_found"),
        (400, SALE_STATUS_NOT_FOUND, "201340400001", "not_found"),
        (400, CRM_NOT_FOUND, "", "not_found"),
        (400, SALE_STATUS_NO_TYPE, "0", "permanent"),
        (400, SALE_STATUS_DUPLICATE, "201350000001", "permanent"),
        (400, SALE_OTHER_ERROR, "0", "permanent"),
        (400, CRM_FIELDS_NOT_ARRAY, "", "permanent"),
        (400, CRM_FILTER_NOT_ARRAY, "", "permanent"),
        (400, CRM_BAD_ID, "", "permanent"),
        (503, QUERY_LIMIT, "QUERY_LIMIT_EXCEEDED", "retry"),
        (429, OPERATION_LIMIT, "OPERATION_TIME_LIMIT", "retry"),
        # the error of one command of a batch, on its own (where it would be 401)
        (
            401,
            BATCH_ALL_FAILED["result"]["result_error"]["get_user"],
            "insufficient_scope",
            "retry",
        ),
    ],
)
def test_documented_errors_are_classified(
    status: int, body: dict[str, Any], code: str, kind: str
) -> None:
    error = error_of(status, body)
    assert error is not None
    assert (error.code, error.description, error.status) == (
        code,
        body["error_description"],
        status,
    )
    assert classify_error(error, 0.0).kind == kind


def test_an_operation_time_limit_without_a_known_reset_waits_a_minute() -> None:
    error = error_of(429, OPERATION_LIMIT)
    assert error is not None
    outcome = classify_error(error, 0.0)
    assert outcome.kind == "retry"
    assert outcome.retry_after == 60.0


def test_a_method_the_portal_lacks_is_no_order_that_is_not_found() -> None:
    # The system error of a method the portal does not have (as the simulator answers it),
    # e.g. sale.* on a deals-only portal: its text says "not found", but not of the order.
    error = error_of(
        404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
    )
    assert error is not None
    assert classify_error(error, 0.0).kind != "not_found"


@pytest.mark.parametrize("body", [SALE_READ_DENIED, SALE_UPDATE_DENIED, CRM_ACCESS_DENIED])
def test_documented_permission_errors_leave_writes_waiting(body: dict[str, Any]) -> None:
    error = error_of(400, body)
    assert error is not None
    outcome = classify_error(error, 0.0)
    assert outcome.kind == "retry"
    assert outcome.reason.startswith("access refused")


def test_errors_without_a_json_body() -> None:
    for status, body in ((503, None), (200, ["not", "an", "answer"])):
        error = error_of(status, body)
        assert error is not None
        assert (error.code, error.description, error.status) == (
            f"HTTP_{status}",
            "no JSON error body",
            status,
        )
    assert classify_error(B24Error("HTTP_503", "", 503), 0.0).kind == "retry"


def test_an_error_can_pass_through_a_context_manager() -> None:
    error = error_of(400, SALE_ORDER_NOT_FOUND)
    assert error is not None

    @contextlib.contextmanager
    def nothing() -> Iterator[None]:
        yield

    with pytest.raises(B24Error) as caught, nothing():
        raise error
    assert caught.value is error
    error.add_note("seen")


# -- snapshots of the documented shapes ------------------------------------------------------


def no_network(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request was expected: {request.url}")


@contextlib.asynccontextmanager
async def client(
    mode: str = "orders", answer: Any = no_network, **settings: Any
) -> AsyncIterator[Bitrix24Client]:
    """A client with a dummy webhook URL; ``answer`` plays the portal (no sockets)."""
    made = Bitrix24Client(
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            bitrix24_mode=mode,
            bitrix24_webhook_url="https://portal.invalid/rest/1/code/",
            bitrix24_application_token="token",
            **settings,
        ),
        ClientContext(),
        transport=httpx.MockTransport(answer),
    )
    try:
        yield made
    finally:
        await made.aclose()


async def test_snapshots_of_documented_orders() -> None:
    async with client() as orders:
        assert orders._snapshot(SALE_ORDER_GET["result"]["order"]) == Snapshot(
            "bitrix24", "236", "bx_65df53063d56d", "N"
        )
        assert [orders._snapshot(o) for o in SALE_ORDER_LIST["result"]["orders"]] == [
            Snapshot("bitrix24", "9", "bx_63498bf7c8d31", "N")
        ]
        # An empty xmlId is no key.
        assert orders._snapshot(SALE_ORDER_UPDATE["result"]["order"]) == Snapshot(
            "bitrix24", "300", None, "N"
        )
    async with client(bitrix24_key_field="accountNumber") as by_number:
        assert by_number._snapshot(SALE_ORDER_GET["result"]["order"]).order_key == "392"


async def test_snapshots_of_documented_deals() -> None:
    async with client("deals") as deals:
        assert deals._snapshot(CRM_DEAL_GET["result"]) == Snapshot(
            "bitrix24", "410", None, "PREPARATION"
        )
        assert [deals._snapshot(d) for d in CRM_DEAL_LIST["result"]] == [
            Snapshot("bitrix24", str(i), None, "C1:NEW") for i in range(37, 43)
        ]
    async with client("deals", bitrix24_key_field="UF_CRM_1721244482250") as by_user_field:
        assert by_user_field._snapshot(CRM_DEAL_GET["result"]).order_key == "Hello world!"


async def test_read_many_on_the_documented_batch_shapes() -> None:
    """The docs' batch answers with our command names: PHP's [] for an empty result list."""
    every_one_refused = json.loads(
        json.dumps(BATCH_ALL_FAILED).replace("get_user", "r0").replace("get_department", "r1")
    )
    one_found = json.loads(json.dumps(BATCH).replace("get_user", "r0"))
    one_found["result"]["result"] = {"r0": SALE_ORDER_GET["result"]}
    answers = [every_one_refused, one_found]

    def portal(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/rest/1/code/batch"
        return httpx.Response(200, json=answers.pop(0))

    async with client(answer=portal) as orders:
        refused = await orders.read_many(["236", "237"])
        found = await orders.read_many(["236"])
    assert set(refused) == {"236", "237"}
    for failure in refused.values():
        assert isinstance(failure, ReadFailed)
        assert "insufficient_scope" in failure.reason
    assert found == {"236": Snapshot("bitrix24", "236", "bx_65df53063d56d", "N")}


async def test_a_read_of_a_method_the_portal_lacks_fails_rather_than_finds_nothing() -> None:
    def portal(request: httpx.Request) -> httpx.Response:
        body = {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
        return httpx.Response(404, json=body)

    async with client(answer=portal) as orders:
        with pytest.raises(ReadFailed, match="ERROR_METHOD_NOT_FOUND"):
            await orders.read("236")
